"""Damaged caches fail loudly: every fault of issue 15 found by verify and by read, naming array, example, shard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from kvkd.cache import CacheError, CacheReader, CacheWriter, Compressor
from kvkd.cache import zarr_adapter as za
from tests.cache.helpers import METADATA, TINY, make_rows, write_all


def _build(url, compressor=Compressor("zstd", 3)):
    writer = CacheWriter.open(url, TINY, METADATA, codec="float32", compressor=compressor)
    rows = write_all(writer)
    assert writer.finalize()
    return rows


def shard_file(url, array: str, shard: int) -> Path:
    arr = zarr.open_group(url, mode="r")[array]
    return Path(url) / array / za.shard_key(arr, shard)


@pytest.fixture
def cache(url):
    return url, _build(url)


def test_clean_cache_verifies_and_reads(cache):
    url, rows = cache
    report = CacheReader.open(url).verify_report()
    assert report.problems == [] and report.notes == []
    out = CacheReader.open(url).read(range(10))
    np.testing.assert_array_equal(out["keys"], rows["keys"])


def test_chunk_equal_to_fill_value_is_stored_and_not_missing(url):
    writer = CacheWriter.open(url, TINY, METADATA, codec="float32")
    for shard in writer.pending_shards():
        rows = make_rows(TINY, *TINY.shard_range(shard))
        rows["slot_importance"][:] = 0  # legitimately all zero = the fill value
        rows["answer_nll"][:] = 0
        writer.write_shard(shard, rows)
    writer.finalize()
    assert CacheReader.open(url).verify() == []
    assert float(CacheReader.open(url).read([5])["answer_nll"][0]) == 0.0


def _expect_read_error(url, example, *words):
    with pytest.raises(CacheError) as e:
        CacheReader.open(url).read([example])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_deleted_keys_shard(cache):
    url, _ = cache
    shard_file(url, "keys", 1).unlink()
    problems = CacheReader.open(url).verify()
    assert problems == ["array 'keys', examples 4-7 (shard 1): shard file missing (the examples' flags say written)"]
    _expect_read_error(url, 5, "'keys'", "examples 4-7", "shard 1", "missing")
    CacheReader.open(url).read([0, 9])  # other shards still read


def test_values_shard_emptied(cache):
    url, _ = cache
    shard_file(url, "values", 0).write_bytes(b"")
    assert CacheReader.open(url).verify() == ["array 'values', examples 0-3 (shard 0): shard file is empty (0 bytes)"]
    _expect_read_error(url, 2, "'values'", "shard 0", "empty")


def test_flipped_byte_in_hidden_chunk(cache):
    url, _ = cache
    path = shard_file(url, "hidden", 2)
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01  # inside the first chunk (example 8), not the index
    path.write_bytes(bytes(data))
    problems = CacheReader.open(url).verify()
    assert problems[0].startswith("array 'hidden', examples 8-9 (shard 2): shard file checksum differs")
    assert any(p.startswith("array 'hidden', example 8 (shard 2): unreadable chunk") for p in problems), problems
    assert not any("example 9 " in p for p in problems)
    _expect_read_error(url, 9, "'hidden'", "examples 8-9", "shard 2", "checksum differs")  # whole shard checked once
    index_only = CacheReader.open(url, check="index")
    index_only.read([9])  # the other chunk of that shard is intact
    with pytest.raises(CacheError, match=r"'hidden', example 8 \(shard 2\): unreadable chunk \(ValueError: Stored and computed checksum"):
        index_only.read([8])


def test_truncated_shard(cache):
    url, _ = cache
    path = shard_file(url, "slot_score", 1)
    path.write_bytes(path.read_bytes()[:-7])
    problems = CacheReader.open(url).verify()
    assert len(problems) == 1 and problems[0].startswith("array 'slot_score', examples 4-7 (shard 1): shard file is")
    _expect_read_error(url, 4, "'slot_score'", "shard 1")


def test_swapped_shards_with_identical_indexes(url):
    _build(url, Compressor("none"))  # fixed-size chunks: both shards have the same index bytes
    a, b = shard_file(url, "keys", 0), shard_file(url, "keys", 1)
    da, db = a.read_bytes(), b.read_bytes()
    assert da[-68:] == db[-68:]
    a.write_bytes(db)
    b.write_bytes(da)
    problems = CacheReader.open(url).verify()
    assert [p.split(":")[0] for p in problems] == ["array 'keys', examples 0-3 (shard 0)", "array 'keys', examples 4-7 (shard 1)"]
    assert all("another shard's file" in p for p in problems)


def test_swapped_shards_found_at_read(cache):
    url, _ = cache
    a, b = shard_file(url, "cot_len", 0), shard_file(url, "cot_len", 1)
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    _expect_read_error(url, 1, "'cot_len'", "shard 0", "another shard's file")
    with pytest.raises(CacheError, match="fails the check 'slot_valid count"):  # index-only: the row checks catch it
        CacheReader.open(url, check="index").read([1])


def test_flipped_cot_len_byte(cache):
    url, _ = cache
    path = shard_file(url, "cot_len", 0)
    data = bytearray(path.read_bytes())
    data[0] ^= 0x40
    path.write_bytes(bytes(data))
    assert any("'cot_len', example 0 (shard 0): unreadable chunk" in p for p in CacheReader.open(url).verify())
    _expect_read_error(url, 0, "'cot_len'", "shard 0", "checksum differs")


def test_deleted_slot_valid_shard_fails_read_and_column(cache):
    url, _ = cache
    shard_file(url, "slot_valid", 2).unlink()
    _expect_read_error(url, 9, "'slot_valid'", "shard 2", "missing")
    with pytest.raises(CacheError, match="slot_valid"):
        CacheReader.open(url).column("answer_nll")


def test_chunk_removed_from_shard_index(cache):
    """A shard whose index lost one chunk (rewritten by hand) reads as missing, never as zeros."""
    from kvkd.cache.integrity import digest

    url, rows = cache
    group = zarr.open_group(url, mode="r+")
    arr = group["answer_len"].with_config({"write_empty_chunks": False})
    za.delete_object(arr, za.shard_key(arr, 1))
    arr[4:8] = np.array([rows["answer_len"][4], 0, rows["answer_len"][6], rows["answer_len"][7]], np.int32)  # chunk 5 not stored
    names = group.attrs["checksums"]["arrays"]
    group["shard_checksums"][1, names.index("answer_len")] = digest(shard_file(url, "answer_len", 1).read_bytes())  # as if written so
    problems = CacheReader.open(url).verify()
    assert "array 'answer_len', example 5 (shard 1): chunk missing from the shard file (the example's flag says written)" in problems


def test_rows_inconsistent_refused_at_read(url):
    writer = CacheWriter.open(url, TINY, METADATA)
    rows = make_rows(TINY, 0, 4)
    rows["cot_len"][2] = 1
    rows["slot_valid"][2] = True  # 4 valid slots for a 1-token CoT
    writer.write_shard(0, rows)
    with pytest.raises(CacheError, match=r"example 2 \(shard 0\) fails the check 'slot_valid count"):
        CacheReader.open(url, allow_incomplete=True).read([0, 2])


def test_schema_1_cache_reads_and_verify_notes_no_checksums(cache, tmp_path):
    url, rows = cache
    old = str(tmp_path / "old.zarr")
    shutil.copytree(url, old)
    shutil.rmtree(Path(old) / "shard_checksums")
    meta_path = Path(old) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["schema_version"] = 1
    del meta["attributes"]["checksums"]
    meta_path.write_text(json.dumps(meta))
    reader = CacheReader.open(old)
    np.testing.assert_array_equal(reader.read(range(10))["hidden"], rows["hidden"])
    report = reader.verify_report()
    assert report.problems == [] and "no checksums" in report.notes[0]
    assert "none" in reader.info()["checksums"]
    shard_file(old, "keys", 1).unlink()  # a missing shard is still found without checksums
    assert CacheReader.open(old).verify()[0].startswith("array 'keys', examples 4-7 (shard 1): shard file missing")
    _expect_read_error(old, 4, "'keys'", "missing")


def test_verify_reports_progress(cache):
    url, _ = cache
    seen = []
    CacheReader.open(url).verify(on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_worker_error_keeps_one_line():
    """A CacheError raised in a DataLoader worker reaches the main process as its one line."""
    from torch._utils import ExceptionWrapper

    try:
        raise CacheError("cache x: array 'keys', example 3 (shard 0): chunk missing")
    except CacheError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(CacheError) as e:
        wrapped.reraise()
    assert str(e.value) == "cache x: array 'keys', example 3 (shard 0): chunk missing (in a data-loader worker)"
