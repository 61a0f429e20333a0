"""CacheWriter: write/read round trip, crash and resume, mismatches, row validation."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest

import kvkd.cache
from kvkd.cache import CacheError, CacheLayout, CacheMismatchError, CacheReader, CacheWriter, Compressor
from kvkd.cache.writer import CacheWriter as _Writer

from .helpers import METADATA, TINY, make_rows, write_all


def test_write_then_read_equal(url):
    writer = CacheWriter.open(url, TINY, METADATA, codec="float32")
    assert writer.pending_shards() == [0, 1, 2]
    rows = write_all(writer)
    assert writer.pending_shards() == []
    assert writer.finalize()
    reader = CacheReader.open(url)
    assert len(reader) == 10 and reader.layout == TINY
    out = reader.read(range(10))
    assert set(out) == set(rows)
    for k in rows:
        np.testing.assert_array_equal(out[k], rows[k])
    attrs = reader.metadata
    assert attrs["status"] == "complete" and attrs["schema_version"] == 2 and attrs["kvkd_version"] == "0.1.0"
    assert attrs["dataset"]["fingerprint"] == "fp-1" and attrs["codec"]["name"] == "float32"
    assert attrs["layout"]["examples_per_shard"] == 4 and "created" in attrs and "completed" in attrs
    assert not (Path(url) / ".claims").exists()  # no claims left behind once complete
    assert writer.stored_bytes() == reader.info()["stored_bytes"] > 0


def test_crash_mid_shard_then_resume(url, monkeypatch):
    writer = CacheWriter.open(url, TINY, METADATA, codec="float32")
    writer.write_shard(0, make_rows(TINY, 0, 4))
    real_write_flags = _Writer._write_flags

    def crash(self, shard, value):
        raise RuntimeError("killed")  # after every data array of the shard was written

    monkeypatch.setattr(_Writer, "_write_flags", crash)
    with pytest.raises(RuntimeError, match="killed"):
        writer.write_shard(1, make_rows(TINY, 4, 8, seed=99))  # different data than the redo
    monkeypatch.setattr(_Writer, "_write_flags", real_write_flags)
    assert (Path(url) / "keys" / "c" / "1" / "0" / "0" / "0" / "0").is_file()  # data was there ...
    assert not writer.finalize()  # ... but flags were not

    with pytest.raises(CacheError, match="kvkd extract"):
        CacheReader.open(url)
    partial = CacheReader.open(url, allow_incomplete=True)
    np.testing.assert_array_equal(partial.read([0, 3])["keys"], make_rows(TINY, 0, 4)["keys"][[0, 3]])
    with pytest.raises(CacheError, match=r"example 5 \(shard 1\)"):
        partial.read([5])

    resumed = CacheWriter.open(url, TINY, copy.deepcopy(METADATA), codec="float32")
    assert resumed.pending_shards() == [1, 2]
    rows = write_all(resumed)
    assert resumed.finalize()
    out = CacheReader.open(url).read(slice(None))
    for k in rows:
        np.testing.assert_array_equal(out[k], rows[k])  # seed-0 rows: the crashed data is gone
    assert partial.read([5])["cot_len"][0] == rows["cot_len"][5]  # a live reader sees new shards


def test_pending_shards_part(url):
    writer = CacheWriter.open(url, TINY, METADATA)
    assert writer.pending_shards(part=(0, 2)) == [0, 2]
    assert writer.pending_shards(part=(1, 2)) == [1]
    writer.write_shard(2, make_rows(TINY, 8, 10))
    assert writer.pending_shards(part=(0, 2)) == [0]
    with pytest.raises(ValueError, match="part"):
        writer.pending_shards(part=(2, 2))


def test_shard_written_twice_is_refused(url):
    writer = CacheWriter.open(url, TINY, METADATA)
    writer.write_shard(0, make_rows(TINY, 0, 4))
    with pytest.raises(CacheError, match="shard 0 .* already written"):
        writer.write_shard(0, make_rows(TINY, 0, 4))


@pytest.mark.parametrize(
    "change, field, old, new",
    [
        (lambda m: m["dataset"].update(fingerprint="fp-2"), "dataset.fingerprint", "fp-1", "fp-2"),
        (lambda m: m["tokenizer"].update(hash="other"), "tokenizer.hash", "tok-hash-1", "other"),
        (lambda m: m["compression"].update(slots=8), "compression.slots", 4, 8),
        (lambda m: m.update(teacher={"model": "other"}), "teacher.model", "tiny-random-llama", "other"),
        (lambda m: m.update(notes="new key"), "notes", "<missing>", "new key"),
    ],
)
def test_reopen_with_other_metadata_names_the_field(url, change, field, old, new):
    CacheWriter.open(url, TINY, METADATA)
    meta = copy.deepcopy(METADATA)
    change(meta)
    with pytest.raises(CacheMismatchError) as err:
        CacheWriter.open(url, TINY, meta)
    assert err.value.field == field and err.value.values == {"existing": old, "requested": new}
    assert field in str(err.value) and repr(old) in str(err.value) and repr(new) in str(err.value)
    assert "overwrite" in str(err.value) and isinstance(err.value, ValueError)


def test_reopen_with_other_layout_codec_compressor(url):
    CacheWriter.open(url, TINY, METADATA)
    other = CacheLayout(10, 2, 3, 8, 16, slots=4, examples_per_shard=5)
    with pytest.raises(CacheMismatchError, match="layout.examples_per_shard = 4"):
        CacheWriter.open(url, other, METADATA)
    with pytest.raises(CacheMismatchError) as err:
        CacheWriter.open(url, TINY, METADATA, codec="bfloat16")
    assert err.value.field == "codec.name"
    with pytest.raises(CacheMismatchError) as err:
        CacheWriter.open(url, TINY, METADATA, compressor=Compressor("zstd", 5))
    assert err.value.field == "compressor.level"


def test_volatile_metadata_is_ignored_and_overwrite_restarts(url):
    writer = CacheWriter.open(url, TINY, {**METADATA, "run": {"created": "monday", "host": "a"}})
    writer.write_shard(0, make_rows(TINY, 0, 4))
    again = CacheWriter.open(url, TINY, {**METADATA, "run": {"created": "tuesday", "host": "b"}})
    assert again.pending_shards() == [1, 2]
    fresh = CacheWriter.open(url, TINY, {**METADATA, "dataset": {"fingerprint": "fp-2"}}, overwrite=True)
    assert fresh.pending_shards() == [0, 1, 2]
    assert fresh.metadata["dataset"] == {"fingerprint": "fp-2"} and fresh.metadata["status"] == "incomplete"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(keys=r["keys"][:, :1]), r"'keys': expected shape \(4, 2, 3, 4, 8\), got \(4, 1, 3, 4, 8\)"),
        (lambda r: r.update(hidden=r["hidden"][:3]), r"'hidden': expected shape \(4, 3, 16\), got \(3, 3, 16\)"),
        (lambda r: r.update(slot_pos=r["slot_pos"].astype(np.int64)), "'slot_pos': expected dtype int32, got int64"),
        (lambda r: r.update(keys=r["keys"].astype(np.float16)), "'keys': expected dtype float32, got float16"),
        (lambda r: r["values"].__setitem__((2, 0, 0, 0, 0), np.nan), r"'values': non-finite .*shard row 2\)"),
        (lambda r: r["hidden"].__setitem__((1, 0, 0), 1e6), "'hidden': value 1e\\+06 overflows codec 'float16'"),
        (lambda r: r.pop("answer_nll"), r"missing \['answer_nll'\]"),
        (lambda r: r.update(extra=np.zeros(4)), r"unexpected \['extra'\]"),
    ],
)
def test_rows_are_validated(url, edit, message):
    writer = CacheWriter.open(url, TINY, METADATA)
    rows = make_rows(TINY, 0, 4)
    edit(rows)
    with pytest.raises(CacheError, match=message):
        writer.write_shard(0, rows)
    assert writer.pending_shards() == [0, 1, 2]


def test_metadata_is_plain_json_without_pickle(url):
    writer = CacheWriter.open(url, TINY, METADATA)
    write_all(writer)
    writer.finalize()
    for meta_file in Path(url).rglob("zarr.json"):
        json.loads(meta_file.read_text())  # every metadata document is JSON
    attrs = json.loads((Path(url) / "zarr.json").read_text())["attributes"]
    assert {k: attrs[k] for k in METADATA} == METADATA
    assert not list(Path(url).rglob("*.pkl"))
    for source in Path(kvkd.cache.__file__).parent.glob("*.py"):  # no pickle anywhere in the cache
        assert "import pickle" not in source.read_text() and "pickle." not in source.read_text(), source
    json.dumps(CacheReader.open(url).info())


def test_bad_metadata_and_foreign_directory(tmp_path, url):
    with pytest.raises(ValueError, match="reserved"):
        CacheWriter.open(url, TINY, {**METADATA, "status": "complete"})
    with pytest.raises(ValueError, match="plain JSON"):
        CacheWriter.open(url, TINY, {**METADATA, "nll": float("nan")})
    with pytest.raises(ValueError, match="plain JSON"):
        CacheWriter.open(url, TINY, {**METADATA, "fn": np.zeros(2)})
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    with pytest.raises(CacheError, match="not a kvkd cache"):
        CacheWriter.open(str(tmp_path / "home"), TINY, METADATA, overwrite=True)
    assert (tmp_path / "home" / "notes.txt").read_text() == "precious"


def test_auto_shard_size_is_stored_resolved(url):
    writer = CacheWriter.open(url, CacheLayout(10, 2, 3, 8, 16, 4), METADATA)
    assert writer.layout.examples_per_shard == 10 and writer.pending_shards() == [0]
    again = CacheWriter.open(url, CacheLayout(10, 2, 3, 8, 16, 4), METADATA)  # auto resolves the same
    assert again.layout == writer.layout
