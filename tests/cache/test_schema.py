"""CacheLayout: array specs, automatic shard size, shard ranges."""

import numpy as np
import pytest

from kvkd.cache import CacheLayout, get_codec

from .helpers import TINY

# SmolLM2-135M: L=30, H_kv=3, D=64, d=576; M=24 slots.
SMOL = CacheLayout(num_examples=1000, num_layers=30, num_kv_heads=3, head_dim=64, hidden_size=576, slots=24)


def test_arrays_float16():
    arrays = TINY.arrays(get_codec("float16"))
    assert list(arrays) == [
        "keys", "values", "hidden", "slot_pos", "slot_importance", "slot_score", "slot_valid",
        "cot_len", "answer_len", "answer_nll", "written",
    ]
    assert arrays["keys"].shape == (2, 3, 4, 8) and arrays["keys"].dtype == np.float16 and arrays["keys"].encoded
    assert arrays["hidden"].shape == (3, 16)
    assert arrays["slot_valid"].shape == (2, 3, 4) and arrays["slot_valid"].dtype == np.bool_
    assert arrays["cot_len"].shape == () and arrays["written"].dtype == np.uint8


def test_arrays_int8_and_bfloat16_parts():
    arrays = TINY.arrays(get_codec("int8"))
    assert arrays["keys"].dtype == np.int8
    assert arrays["keys_scale"].shape == (2, 3, 4) and arrays["keys_scale"].dtype == np.float16
    assert arrays["hidden_scale"].shape == (3,)
    assert TINY.arrays(get_codec("bfloat16"))["values"].dtype == np.uint16
    assert TINY.row_specs()["keys"].dtype == np.float32  # what writers pass and readers get


def test_auto_shard_size_smollm2():
    # float16 bytes/example: keys+values 2*30*3*24*64*2 = 552960, hidden 31*576*2 = 35712,
    # slot_pos/importance/score 3*2160*4 = 25920, slot_valid 2160, scalars 4+4+4, flag 1
    assert SMOL.bytes_per_example(get_codec("float16")) == 616765
    layout = SMOL.resolved(get_codec("float16"))
    assert layout.examples_per_shard == 32 * 2**20 // 616765 == 54
    assert layout.num_shards == 19 and layout.shard_range(18) == (972, 1000)
    assert SMOL.bytes_per_example(get_codec("float32")) == 1205437  # keys/values/hidden doubled
    assert SMOL.resolved(get_codec("float32")).examples_per_shard == 27


def test_auto_shard_size_is_clamped():
    tiny = CacheLayout(3, 2, 3, 8, 16, 4)
    assert tiny.resolved(get_codec("float16")).examples_per_shard == 3
    huge = CacheLayout(5, 200, 64, 256, 16384, 512)  # one example > 32 MiB
    assert huge.resolved(get_codec("float32")).examples_per_shard == 1


def test_shard_ranges():
    assert TINY.num_shards == 3
    assert [TINY.shard_range(i) for i in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert [TINY.shard_of(e) for e in (0, 3, 4, 9)] == [0, 0, 1, 2]
    with pytest.raises(IndexError):
        TINY.shard_range(3)
    with pytest.raises(ValueError, match="resolved"):
        SMOL.num_shards


def test_validation_and_json():
    with pytest.raises(ValueError, match="slots must be >= 1"):
        CacheLayout(10, 2, 3, 8, 16, 0)
    with pytest.raises(ValueError, match="must be an int"):
        CacheLayout(10, 2, 3, 8, 16.0, 4)
    assert CacheLayout.from_json(TINY.to_json()) == TINY
