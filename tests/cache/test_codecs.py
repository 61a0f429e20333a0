"""Storage codecs and compressors: one round-trip suite over every registered codec."""

import json

import numpy as np
import pytest
import torch

from kvkd.cache import CODECS, CacheReader, CacheWriter, Compressor, codec_from_json, get_codec
from kvkd.cache.codecs import bfloat16_bits_to_float32, float32_to_bfloat16_bits

from .helpers import METADATA, TINY, write_all

COMPRESSORS = [Compressor("zstd", 3), Compressor("blosc", 5, "bit"), Compressor("none")]


def rel_rmse(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x - y) ** 2)) / np.sqrt(np.mean(x**2)))


@pytest.mark.parametrize("shape", [(64, 3, 64), (16, 31, 576)], ids=["D=64", "d=576"])
@pytest.mark.parametrize("name", CODECS.names())
def test_codec_round_trip_within_declared_bound(name, shape):
    codec = get_codec(name)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    parts = codec.encode(x)
    want = codec.storage_dtypes(x.shape)
    assert {k: (p.shape, p.dtype) for k, p in parts.items()} == want
    y = codec.decode(parts)
    assert y.dtype == np.float32 and y.shape == x.shape
    err = rel_rmse(x, y)
    assert err <= codec.max_rel_rmse
    if codec.max_rel_rmse == 0:
        np.testing.assert_array_equal(x, y)
    else:  # the bound is a real one, not a blanket
        assert err > codec.max_rel_rmse / 10


@pytest.mark.parametrize("compressor", COMPRESSORS, ids=lambda c: f"{c.name}-{c.shuffle}")
@pytest.mark.parametrize("name", CODECS.names())
def test_codec_round_trip_through_cache(tmp_path, name, compressor):
    writer = CacheWriter.open(str(tmp_path / "c.zarr"), TINY, METADATA, codec=name, compressor=compressor)
    rows = write_all(writer)
    assert writer.finalize()
    reader = CacheReader.open(str(tmp_path / "c.zarr"))
    out = reader.read(slice(None))
    codec = get_codec(name)
    for key in ("keys", "values", "hidden"):
        np.testing.assert_array_equal(out[key], codec.decode(codec.encode(rows[key])))  # storage is lossless
        assert rel_rmse(rows[key], out[key]) <= codec.max_rel_rmse
    for key in ("slot_pos", "slot_importance", "slot_score", "slot_valid", "cot_len", "answer_len", "answer_nll"):
        np.testing.assert_array_equal(out[key], rows[key])
        assert out[key].dtype == rows[key].dtype
    assert reader.metadata["compressor"] == compressor.to_json()
    inner = reader.info()["arrays"]["keys"]["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in inner] == ["bytes"] + ([] if compressor.name == "none" else [compressor.name]) + ["crc32c"]


def test_bfloat16_bits_match_torch():
    rng = np.random.default_rng(1)
    specials = np.array(
        [0.0, -0.0, 1.0, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.0e38, -3.4e38, 1e-40, -1e-42,
         np.inf, -np.inf, np.nan, 65504.0, 2.0**-126],
        dtype=np.float32,
    )
    wide = rng.standard_normal(10_000) * 10.0 ** rng.integers(-30, 30, 10_000)  # all exponents
    x = np.concatenate([specials, wide.astype(np.float32)])
    ours = float32_to_bfloat16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bfloat16_bits_to_float32(ours[nan])).all()  # any NaN payload is a NaN
    back = torch.from_numpy(ours.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bfloat16_bits_to_float32(ours), back)


def test_bfloat16_rounds_to_nearest_even_by_hand():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20], dtype=np.float32)
    # ties go to the even mantissa (0x3F80, 0x3F82); just above a tie rounds up
    assert float32_to_bfloat16_bits(x).tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81]


def test_int8_by_hand():
    codec = get_codec({"name": "int8", "scale_dtype": "float32"})
    parts = codec.encode(np.array([[1.0, -3.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32))
    assert parts[""].tolist() == [[32, -95, 16, 127], [0, 0, 0, 0]]  # round(x * 127 / 4)
    np.testing.assert_allclose(parts["_scale"], [4 / 127, 0.0], rtol=1e-7)
    assert codec.decode(parts)[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_float16_overflow_is_an_error_naming_a_fix():
    with pytest.raises(ValueError, match="bfloat16"):
        get_codec("float16").encode(np.array([1.0, 70000.0], dtype=np.float32))
    with pytest.raises(ValueError, match="float32"):
        get_codec("float16").encode(np.array([1.0, 2.0]))  # float64 input


@pytest.mark.parametrize("name", CODECS.names())
def test_codec_json_round_trip(name):
    codec = get_codec(name)
    d = json.loads(json.dumps(codec.to_json()))
    assert d["name"] == name and codec_from_json(d) == codec
    assert get_codec("bfloat16").to_json()["logical_dtype"] == "bfloat16"


def test_codec_errors():
    with pytest.raises(KeyError, match="unknown codec 'fp8'.*float16"):
        get_codec("fp8")
    with pytest.raises(ValueError, match="scale_dtype"):
        get_codec({"name": "int8", "scale_dtype": "int4"})
    with pytest.raises(ValueError, match="no field"):
        codec_from_json({"name": "float16", "bits": 3})


def test_compressor_json_and_validation():
    for c in COMPRESSORS:
        assert Compressor.from_json(json.loads(json.dumps(c.to_json()))) == c
    blosc = Compressor("blosc", 5, "bit").zarr_codecs()[0]
    assert blosc.shuffle.value == "bitshuffle" and blosc.clevel == 5 and blosc.cname.value == "zstd"
    assert Compressor("none").zarr_codecs() == []
    with pytest.raises(ValueError, match="needs compressor 'blosc'"):
        Compressor("zstd", 3, "bit")
    with pytest.raises(ValueError, match="level"):
        Compressor("blosc", 12)
    with pytest.raises(ValueError, match="compressor must be"):
        Compressor("lz4")
