"""Training on a damaged cache fails with one line naming array, example and shard (issue 15)."""

import shutil
from pathlib import Path

import pytest
import zarr

from kvkd.cache import CacheError
from kvkd.cache import zarr_adapter as za
from kvkd.pipeline.extract import ExtractConfig, extract
from kvkd.train.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def cache(tmp_path_factory, shared_data, tiny_teacher):
    root = tmp_path_factory.mktemp("damaged")
    data = root / "train.jsonl"
    data.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:8]) + "\n")
    out = root / "t.zarr"
    extract(ExtractConfig(model=str(tiny_teacher), data=str(data), out=str(out), slots=4, batch_size=4, examples_per_shard=4, trace_fallback="nl"))
    return out


def _shard_file(url, array, shard):
    arr = zarr.open_group(str(url), mode="r")[array]
    return Path(url) / array / za.shard_key(arr, shard)


def _train(url, out, tiny_student, workers):
    return train(TrainConfig(caches=[str(url)], out=str(out), student=str(tiny_student), steps=2, batch_size=4, lora_r=4,
                             num_workers=workers, warmup_steps=1, router="fixed"))


@pytest.mark.parametrize("array", ["keys", "slot_valid"])
def test_deleted_shard_refused_before_the_run_folder(cache, tmp_path, tiny_student, array):
    url = tmp_path / "c.zarr"
    shutil.copytree(cache, url)
    _shard_file(url, array, 1).unlink()
    with pytest.raises(CacheError, match=rf"array '{array}', examples 4-7 \(shard 1\): shard file missing"):
        _train(url, tmp_path / "run", tiny_student, 0)
    assert not (tmp_path / "run").exists()


def test_flipped_byte_fails_in_worker_with_one_line(cache, tmp_path, tiny_student):
    url = tmp_path / "c.zarr"
    shutil.copytree(cache, url)
    path = _shard_file(url, "hidden", 0)
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError) as e:
        _train(url, tmp_path / "run", tiny_student, 1)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert "array 'hidden', examples 0-3 (shard 0)" in msg and "in a data-loader worker" in msg
