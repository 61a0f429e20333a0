"""Parallel extraction: parts split on shard boundaries give the single-process cache, resume on
their own, the last one marks the cache complete, and a second writer of a shard fails loudly."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from kvkd.cache import claims
from kvkd.cache.errors import CacheError
from kvkd.cache.reader import CacheReader
from kvkd.pipeline.extract import ExtractConfig, extract, extraction_part

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rows(tmp_path_factory, shared_data):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:10]) + "\n")
    return path


def _cfg(rows, out, tiny_teacher, **kw):
    # 10 rows in shards of 3 -> 4 shards (the last one short): part 0 gets shards 0, 2; part 1 gets 1, 3
    base = dict(model=str(tiny_teacher), data=str(rows), out=str(out), slots=4, batch_size=2, examples_per_shard=3)
    base.update(kw)
    return ExtractConfig(**base)


@pytest.fixture(scope="module")
def single(rows, tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("single") / "c.zarr"
    assert extract(_cfg(rows, out, tiny_teacher)).complete
    return out


def _assert_same_cache(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names = sorted(name for name, _ in ga.arrays())
    assert names == sorted(name for name, _ in gb.arrays())
    for name in names:
        np.testing.assert_array_equal(np.asarray(ga[name][:]), np.asarray(gb[name][:]), err_msg=name)
    skip = {"created", "completed"}
    ma = {k: v for k, v in ga.attrs.asdict().items() if k not in skip}
    mb = {k: v for k, v in gb.attrs.asdict().items() if k not in skip}
    assert ma == mb
    assert not (b / claims.CLAIMS_DIR).exists()  # claims are cleaned once complete


def test_part_from_flags_env_or_single():
    cfg = ExtractConfig(num_shards=3, shard_index=2)
    assert extraction_part(cfg, env={"RANK": "0", "WORLD_SIZE": "2"}) == (2, 3)  # flags win
    assert extraction_part(ExtractConfig(), env={"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert extraction_part(ExtractConfig(), env={}) == (0, 1)
    with pytest.raises(ValueError, match="--shard-index"):
        extraction_part(ExtractConfig(num_shards=2), env={})
    with pytest.raises(ValueError, match=r"not in \[0, 2\)"):
        extraction_part(ExtractConfig(num_shards=2, shard_index=2), env={})
    with pytest.raises(ValueError, match="--overwrite"):
        extraction_part(ExtractConfig(num_shards=2, shard_index=0, overwrite=True), env={})


def test_two_jobs_give_the_single_process_cache(rows, tmp_path, tiny_teacher, single):
    out = tmp_path / "jobs.zarr"
    first = extract(_cfg(rows, out, tiny_teacher, num_shards=2, shard_index=1))
    assert first.part == [1, 2] and first.shards_written == 2 and first.examples_written == 4  # shards 1 (3 rows) and 3 (1 row)
    assert not first.complete  # part 0 has not run yet
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader.open(str(out))
    again = extract(_cfg(rows, out, tiny_teacher, num_shards=2, shard_index=1))  # a part resumes on its own: nothing left
    assert again.shards_written == 0 and again.shards_skipped == 2 and not again.complete
    last = extract(_cfg(rows, out, tiny_teacher, num_shards=2, shard_index=0))
    assert last.shards_written == 2 and last.complete  # the part finishing last marks it complete
    _assert_same_cache(single, out)


def test_second_writer_of_a_shard_fails_loudly(rows, tmp_path, tiny_teacher):
    out = tmp_path / "c.zarr"
    extract(_cfg(rows, out, tiny_teacher, num_shards=2, shard_index=0))  # creates the store, writes shards 0, 2
    held = claims.acquire(claims.claims_dir(str(out)), 1)  # a live writer (this test process) holds shard 1
    try:
        with pytest.raises(CacheError, match="another writer holds shard 1"):
            extract(_cfg(rows, out, tiny_teacher, num_shards=2, shard_index=1))
    finally:
        held.release()
    flags = np.asarray(zarr.open_group(str(out), mode="r")["written"][:])
    assert flags.tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 1, 0]  # shard 1 untouched, nothing half-written
    assert extract(_cfg(rows, out, tiny_teacher, num_shards=2, shard_index=1)).complete


@pytest.mark.slow
def test_two_ranks_give_the_single_process_cache(rows, tmp_path, tiny_teacher, single):
    out = tmp_path / "ranks.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kvkd.cli", "extract",
           "--model", str(tiny_teacher), "--data", str(rows), "--out", str(out), "--slots", "4", "--batch-size", "2",
           "--examples-per-shard", "3", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_same_cache(single, out)


def test_a_shard_written_behind_a_parts_back_fails_loudly(rows, tmp_path, tiny_teacher, monkeypatch):
    """Where claims cannot help (another host, object stores), a part still refuses to redo a shard
    that someone else wrote while it was running."""
    import kvkd.pipeline.extract as ex
    from kvkd.cache.writer import CacheWriter

    out = tmp_path / "c.zarr"
    real = ex.capture_batch
    calls = []

    def capture_and_intrude(model, batch):  # while part 0 computes shard 0, "another job" writes shard 2
        calls.append(1)
        if len(calls) == 1:
            other = CacheWriter.open(str(out), *_open_args(out))
            other.write_shard(2, _rows_of(other, 2))
        return real(model, batch)

    monkeypatch.setattr(ex, "capture_batch", capture_and_intrude)
    with pytest.raises(CacheError, match="shard 2 of .* was written by another writer while part 0 of 2 was running"):
        extract(_cfg(rows, out, tiny_teacher, num_shards=2, shard_index=0))


def _open_args(out):
    """Layout, metadata, codec and compressor of an existing cache (to open a second writer)."""
    from kvkd.cache.codecs import CodecSet, Compressor
    from kvkd.cache.schema import CacheLayout
    from kvkd.cache.writer import RESERVED_KEYS

    attrs = zarr.open_group(str(out), mode="r").attrs.asdict()
    meta = {k: v for k, v in attrs.items() if k not in RESERVED_KEYS}
    return CacheLayout.from_json(attrs["layout"]), meta, CodecSet.from_metadata(attrs), Compressor.from_json(attrs["compressor"])


def _rows_of(writer, shard):
    from kvkd.pipeline.extract import _empty_rows

    lo, hi = writer.layout.shard_range(shard)
    return _empty_rows(writer.layout, hi - lo)
