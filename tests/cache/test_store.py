"""The cache store (kvkd.cache.store): keys, names, resolution, ls, cp (verified, resumable), rm."""

import hashlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import zarr

from kvkd.cache import CacheReader, CacheWriter
from kvkd.cache import zarr_adapter as za
from kvkd.cache.errors import CacheError
from kvkd.cache.store import CacheStore, CopyVerifyError, cache_key, copy_cache, default_root, is_name, list_caches, remove_cache, resolve_cache

from .helpers import METADATA, TINY, make_rows, write_all

MATERIAL = {"teacher": {"source": "gguf", "file_sha256": "ab" * 32, "dtype": "float32"}, "compression": {"slots": 4, "lambda": 0.1}}


def _shard_file(url, array: str, shard: int) -> Path:
    arr = zarr.open_group(url, mode="r")[array]
    return Path(url) / array / za.shard_key(arr, shard)


def _stored(root: Path, name="tiny", material=MATERIAL, complete=True) -> tuple[CacheStore, str]:
    """A cache written under ``root`` as an extraction with ``material`` would (every shard, or the first only)."""
    store = CacheStore(str(root))
    entry = store.prepare(name, material, auto_name=lambda key: f"auto-{key[:8]}")
    w = CacheWriter.open(entry.url, TINY, METADATA)
    if complete:
        write_all(w)
        assert w.finalize(sole_writer=True)
    else:
        w.write_shard(0, make_rows(w.layout, *w.layout.shard_range(0)))
    return store, entry.key


def test_key_is_sha256_of_canonical_json_and_ignores_key_order():
    blob = '{"kvkd_store_key":1,"material":{"a":1,"b":[1,2]}}'
    assert cache_key({"a": 1, "b": [1, 2]}) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert cache_key({"b": [1, 2], "a": 1}) == cache_key({"a": 1, "b": [1, 2]})
    assert cache_key({"a": 1, "b": [2, 1]}) != cache_key({"a": 1, "b": [1, 2]})
    assert cache_key({"a": 1.0}) != cache_key({"a": 2.0})
    with pytest.raises(ValueError, match="plain JSON"):
        cache_key({"a": float("nan")})


def test_names_and_default_root(tmp_path):
    assert is_name("smollm2-gsm8k-3f2a9c1d") and is_name("auto") and is_name("a.b+c_d")
    assert not any(is_name(s) for s in ("a/b", "./a", "s3://b/p", "..", "", "-x", "teacher.zarr"))
    assert default_root({"KVKD_CACHE_ROOT": "s3://team/caches", "KVKD_HOME": "/h"}) == "s3://team/caches"
    assert default_root({"KVKD_HOME": "/h"}) == "/h/caches"


def test_prepare_writes_records_and_a_name_never_moves(tmp_path):
    store, key = _stored(tmp_path)
    assert key == cache_key(MATERIAL)
    assert json.loads((tmp_path / "names" / "tiny.json").read_text())["key"] == key
    record = json.loads((tmp_path / "keys" / f"{key}.json").read_text())
    assert record["material"] == MATERIAL and "@" in record["created_by"] and record["kvkd_version"]
    assert store.prepare("tiny", MATERIAL, auto_name=str).key == key  # same settings: same entry
    other = {**MATERIAL, "compression": {"slots": 8, "lambda": 0.1}}
    with pytest.raises(CacheError, match=r"--out tiny: that name points at cache [0-9a-f]{16} made with compression.slots = 4 where this run has 8.*kvkd cache rm tiny"):
        store.prepare("tiny", other, auto_name=str)
    assert store.prepare("auto", other, auto_name=lambda k: f"auto-{k[:8]}").names == [f"auto-{cache_key(other)[:8]}"]


def test_key_record_with_other_material_is_refused(tmp_path):
    store, key = _stored(tmp_path)
    rec = tmp_path / "keys" / f"{key}.json"
    data = json.loads(rec.read_text())
    data["material"]["compression"]["slots"] = 5
    rec.write_text(json.dumps(data))
    with pytest.raises(CacheError, match="recorded for other settings"):
        store.prepare("tiny", MATERIAL, auto_name=str)


def test_resolve_name_key_path_and_unknown_name(tmp_path):
    store, key = _stored(tmp_path)
    url = str(tmp_path / "caches" / key)
    assert resolve_cache("tiny", str(tmp_path)) == url
    assert resolve_cache(key, str(tmp_path)) == url
    assert resolve_cache(url, str(tmp_path)) == url  # a path stays a path
    assert resolve_cache("s3://bucket/c", str(tmp_path)) == "s3://bucket/c"
    with pytest.raises(CacheError, match=r"no cache named 'tinny' under cache root .*closest: tiny"):
        resolve_cache("tinny", str(tmp_path))


def test_ls_shows_status_from_flags(tmp_path):
    _stored(tmp_path, "done")
    other = {**MATERIAL, "compression": {"slots": 5, "lambda": 0.1}}
    _, half = _stored(tmp_path, "half", other, complete=False)
    rows = {r["name"]: r for r in list_caches(str(tmp_path))}
    assert rows["done"]["status"] == "complete" and rows["done"]["rows"] == 10 and rows["done"]["written"] == 10
    assert rows["done"]["slots"] == 4 and rows["done"]["codec"] == "float16" and rows["done"]["bytes"] > 0
    assert rows["half"]["status"] == "incomplete" and rows["half"]["written"] == 4 and rows["half"]["key"] == half
    assert "@" in rows["done"]["created_by"]


def test_cp_copies_verifies_and_resumes(tmp_path):
    store, key = _stored(tmp_path / "root")
    src, dst = store.url_of(key), str(tmp_path / "copy")
    first = copy_cache(src, dst)
    assert first.files_skipped == 0 and first.status == "complete"
    out = CacheReader.open(dst)
    want = CacheReader.open(src).read(range(10))
    for name, value in out.read(range(10)).items():
        np.testing.assert_array_equal(value, want[name])
    assert out.verify() == []
    second = copy_cache(src, dst)  # a rerun skips the shard objects already there
    assert second.files_skipped > 0 and second.bytes_copied < first.bytes_copied
    # a damaged object at the destination is found by the verification and copied again on the rerun
    path = _shard_file(dst, "keys", 1)
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    copy_cache(src, dst)
    assert CacheReader.open(dst).verify() == []


def test_cp_of_a_flipped_chunk_refuses_to_finish(tmp_path):
    store, key = _stored(tmp_path / "root")
    src = store.url_of(key)
    path = _shard_file(src, "hidden", 2)
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    assert list_caches(str(tmp_path / "root"))[0]["status"] == "complete"  # ls shows it as it is (nothing verified)
    dst = tmp_path / "copy"
    with pytest.raises(CopyVerifyError) as err:
        copy_cache(src, str(dst))
    assert any("'hidden', example 8 (shard 2)" in p for p in err.value.problems), err.value.problems
    assert not (dst / "zarr.json").exists()  # the copy does not read as a cache
    with pytest.raises(CacheError, match="no cache"):
        CacheReader.open(str(dst))


def test_cp_never_writes_into_another_cache(tmp_path):
    store, key = _stored(tmp_path / "root")
    other = tmp_path / "other"
    w = CacheWriter.open(str(other), TINY, {**METADATA, "prompt": "other"})
    write_all(w)
    w.finalize(sole_writer=True)
    with pytest.raises(CacheError, match="holds another cache"):
        copy_cache(store.url_of(key), str(other))
    assert CacheReader.open(str(other)).metadata["prompt"] == "other"


def test_rm_refuses_live_and_incomplete_caches(tmp_path):
    root = str(tmp_path)
    _, key = _stored(tmp_path, "half", complete=False)
    with pytest.raises(CacheError, match="not complete.*--force"):
        remove_cache("half", root)
    claims = tmp_path / "caches" / key / ".claims"
    claims.mkdir(exist_ok=True)
    (claims / "shard-1").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": "t"}))
    with pytest.raises(CacheError, match="being written"):
        remove_cache("half", root, force=True)
    (claims / "shard-1").write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "token": "t"}))  # a dead writer's
    removed = remove_cache("half", root, force=True)
    assert str(tmp_path / "caches" / key) in removed
    assert not (tmp_path / "caches" / key).exists() and not (tmp_path / "names" / "half.json").exists()
    assert not (tmp_path / "keys" / f"{key}.json").exists()
    assert list_caches(root) == []


def test_rm_complete_cache_by_key(tmp_path):
    _, key = _stored(tmp_path, "done")
    remove_cache(key, str(tmp_path))
    with pytest.raises(CacheError, match="no cache named 'done'"):
        resolve_cache("done", str(tmp_path))


def test_cli_ls_cp_rm(tmp_path):
    from typer.testing import CliRunner

    from kvkd.cli import app

    runner = CliRunner()
    root = str(tmp_path / "root")
    _, key = _stored(tmp_path / "root", "tiny")
    r = runner.invoke(app, ["cache", "ls", root])
    assert r.exit_code == 0 and "tiny" in r.output and key in r.output and "complete" in r.output, r.output
    r = runner.invoke(app, ["cache", "ls", root, "--json"])
    assert [(x["name"], x["key"], x["rows"]) for x in json.loads(r.output)] == [("tiny", key, 10)]
    r = runner.invoke(app, ["cache", "ls", str(tmp_path / "roott")])  # a mistyped root: one line, not an empty table
    assert r.exit_code == 2 and "does not exist" in r.output and "roott" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "roott").exists()
    r = runner.invoke(app, ["cache", "info", "tiny", "--cache-root", root, "--json"])
    assert r.exit_code == 0 and '"num_examples": 10' in r.output, r.output
    r = runner.invoke(app, ["cache", "cp", "tiny", str(tmp_path / "copy"), "--cache-root", root])
    assert r.exit_code == 0 and "verified; status complete" in r.output, r.output
    assert CacheReader.open(str(tmp_path / "copy")).verify() == []
    r = runner.invoke(app, ["cache", "rm", "tiny", "--cache-root", root])
    assert r.exit_code == 2 and "pass --yes" in r.output and (tmp_path / "root" / "caches" / key).is_dir()
    r = runner.invoke(app, ["cache", "rm", "tinyy", "--cache-root", root, "--yes"])
    assert r.exit_code == 2 and "closest: tiny" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["cache", "rm", "tiny", "--cache-root", root, "--yes"])
    assert r.exit_code == 0 and not (tmp_path / "root" / "caches" / key).exists()


def test_a_folder_here_with_a_cache_name_of_the_root_is_ambiguous_not_guessed(tmp_path, monkeypatch):
    from kvkd.cache.errors import CacheError

    root = tmp_path / "root"
    store, key = _stored(root, name="team")
    url = store.url_of(key)
    monkeypatch.chdir(tmp_path)
    assert resolve_cache("team", str(root)) == url
    (tmp_path / "team").mkdir()  # e.g. `kvkd cache cp team team` run here made a folder of that name
    with pytest.raises(CacheError, match=r"'team' is both a folder here and a cache name under .*root: pass ./team for the folder"):
        resolve_cache("team", str(root))
    assert resolve_cache("./team", str(root)) == "./team"
