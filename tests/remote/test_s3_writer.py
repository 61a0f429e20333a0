"""CacheWriter/CacheReader on S3 (moto's server): round trip, claims by conditional create,
stale take-over, refusals that name the claim object and how to remove it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvkd.cache import CacheError, CacheReader, CacheWriter
from kvkd.cache import claims
from tests.cache.helpers import METADATA, TINY, full_rows, make_rows

REPO = Path(__file__).resolve().parents[2]


def _fs():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def _put_claim(url: str, shard: int, pid: int, host: str | None = None, token: str = "other") -> str:
    path = url.removeprefix("s3://") + f"/.claims/shard-{shard}"
    _fs().pipe_file(path, json.dumps({"pid": pid, "host": host or socket.gethostname(), "token": token}).encode())
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_all(url: str) -> CacheWriter:
    writer = CacheWriter.open(url, TINY, METADATA)
    for shard in writer.pending_shards():
        writer.write_shard(shard, make_rows(TINY, *TINY.shard_range(shard)))
    assert writer.finalize()
    return writer


def test_s3_round_trip_equals_local_and_claims_cleaned(s3_url, tmp_path):
    _write_all(s3_url)
    _write_all(str(tmp_path / "local.zarr"))
    remote, local = CacheReader.open(s3_url), CacheReader.open(str(tmp_path / "local.zarr"))
    assert remote.metadata["status"] == "complete" and remote.verify() == []
    a, b = remote.read(slice(None)), local.read(slice(None))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    np.testing.assert_array_equal(a["cot_len"], full_rows(TINY)["cot_len"])
    assert not _fs().exists(s3_url.removeprefix("s3://") + "/.claims/shard-0")


def test_second_writer_on_one_shard_refused_by_conditional_create(s3_server, s3_url):
    first = CacheWriter.open(s3_url, TINY, METADATA)
    second = CacheWriter.open(s3_url, TINY, METADATA)
    mark = s3_server.log.mark()
    with first.claim(0):
        with pytest.raises(CacheError, match=rf"another writer holds shard 0 \(pid {os.getpid()}.*claim s3://.*/\.claims/shard-0\)"):
            second.write_shard(0, make_rows(TINY, 0, 4))
        refused = [e for e in s3_server.log.since(mark, "PUT", r"/\.claims/shard-0$") if e[2] == 412]
        assert len(refused) == 1, "the second writer's conditional create got HTTP 412"
        first.write_shard(0, make_rows(TINY, 0, 4))
    assert first.pending_shards() == [1, 2]


_SECOND = """
import sys
from kvkd.cache import CacheError, CacheWriter
from tests.cache.helpers import METADATA, TINY, make_rows
try:
    CacheWriter.open(sys.argv[1], TINY, METADATA).write_shard(0, make_rows(TINY, 0, 4))
except CacheError as e:
    print(e)
    sys.exit(3)
"""


def test_second_writer_process_gets_one_line(s3_url):
    first = CacheWriter.open(s3_url, TINY, METADATA)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with first.claim(0):
        proc = subprocess.run([sys.executable, "-c", _SECOND, s3_url], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.count("\n") == 1 and "another writer holds shard 0" in proc.stdout and "Traceback" not in proc.stderr


def test_stale_claim_of_dead_pid_taken_over_once(s3_url):
    writer = CacheWriter.open(s3_url, TINY, METADATA)
    path = _put_claim(s3_url, 2, _dead_pid(), token="dead1")
    writer.write_shard(2, make_rows(TINY, 8, 10))
    fs = _fs()
    assert not fs.exists(path) and fs.exists(path + ".takeover-dead1")  # the marker stays until completion
    assert writer.pending_shards() == [0, 1]
    # a second take-over of the same stale claim (the marker exists) is refused, not repeated
    _put_claim(s3_url, 1, _dead_pid(), token="dead1")
    fs.mv(path + ".takeover-dead1", s3_url.removeprefix("s3://") + "/.claims/shard-1.takeover-dead1")
    with pytest.raises(CacheError, match="another writer is taking over the stale claim"):
        writer.write_shard(1, make_rows(TINY, 4, 8))
    fs.rm_file(s3_url.removeprefix("s3://") + "/.claims/shard-1")
    writer.write_shard(0, make_rows(TINY, 0, 4))
    writer.write_shard(1, make_rows(TINY, 4, 8))
    assert writer.finalize()
    assert fs.find(s3_url.removeprefix("s3://") + "/.claims") == []  # claims and markers removed on completion


def test_claim_from_another_host_refused_with_url_and_how_to_remove(s3_url):
    writer = CacheWriter.open(s3_url, TINY, METADATA)
    _put_claim(s3_url, 0, 1, host="elsewhere")
    with pytest.raises(CacheError) as e:
        writer.write_shard(0, make_rows(TINY, 0, 4))
    msg = str(e.value)
    assert "host elsewhere" in msg and f"aws s3 rm {s3_url}/.claims/shard-0" in msg and "\n" not in msg


def test_claims_location_per_backend(tmp_path):
    assert claims.location(str(tmp_path / "c")) == tmp_path / "c" / ".claims"
    remote = claims.location("s3://bucket/c.zarr")
    assert isinstance(remote, claims.RemoteClaims) and remote.url == "s3://bucket/c.zarr/.claims"
    assert claims.location("gs://bucket/c.zarr") is None  # no tested exclusive create: claims skipped
    assert claims.location("memory://c.zarr") is None


def test_http_is_refused_for_writing():
    with pytest.raises(CacheError, match=r"^http://127.0.0.1:9/c.zarr: HTTP\(S\) caches are read-only"):
        CacheWriter.open("http://127.0.0.1:9/c.zarr", TINY, METADATA)


def test_endpoint_ignoring_conditional_writes_is_refused(s3_url, monkeypatch):
    writer = CacheWriter.open(s3_url, TINY, METADATA)
    fs = writer._claims.fs
    real = fs.pipe_file  # fsspec binds the sync methods on the instance
    monkeypatch.setattr(fs, "pipe_file", lambda path, data, mode="overwrite", **kw: real(path, data, **kw))  # If-None-Match dropped
    monkeypatch.setattr(claims, "_EXCLUSIVE_CHECKED", set())
    with pytest.raises(CacheError, match="accepted a second conditional create"):
        writer.write_shard(0, make_rows(TINY, 0, 4))
    monkeypatch.undo()
    assert not [p for p in _fs().find(s3_url.removeprefix("s3://") + "/.claims") if "probe-" in p]  # the probe is removed
    writer.write_shard(0, make_rows(TINY, 0, 4))


def test_cache_rm_and_ls_see_a_live_writer_claim_on_s3(s3_url):
    from kvkd.cache.store import describe, live_claims, remove_cache

    _write_all(s3_url)
    assert live_claims(s3_url) == [] and describe(s3_url)["status"] == "complete"
    _put_claim(s3_url, 1, os.getpid())  # a live writer (this process) holds shard 1
    assert live_claims(s3_url) == [f"{s3_url}/.claims/shard-1"]
    assert describe(s3_url)["status"] == "being written"
    with pytest.raises(CacheError, match=r"is being written \(live claim s3://.*/\.claims/shard-1\)"):
        remove_cache(s3_url, force=True)
    assert _fs().exists(s3_url.removeprefix("s3://") + "/zarr.json")  # nothing removed
    _put_claim(s3_url, 1, _dead_pid())  # its writer died on this host: stale, no longer blocks
    assert live_claims(s3_url) == []
    assert remove_cache(s3_url) and not _fs().exists(s3_url.removeprefix("s3://") + "/zarr.json")
