"""One writer per shard: claim files, stale take-over, and parallel writers on disjoint shards."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kvkd.cache import CacheError, CacheReader, CacheWriter
from kvkd.cache.claims import claims_dir

from .helpers import METADATA, TINY, full_rows, make_rows

REPO = Path(__file__).resolve().parents[2]


def _write_claim(url: str, shard: int, pid: int, host: str | None = None) -> Path:
    path = Path(url) / ".claims" / f"shard-{shard}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "token": "other"}))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_live_claim_blocks_a_second_writer(url):
    writer = CacheWriter.open(url, TINY, METADATA)
    claim = _write_claim(url, 0, os.getpid())  # "another writer" that is alive: this very process
    with pytest.raises(CacheError, match=f"another writer holds shard 0 \\(pid {os.getpid()}"):
        writer.write_shard(0, make_rows(TINY, 0, 4))
    assert claim.exists() and writer.pending_shards() == [0, 1, 2]
    writer.write_shard(1, make_rows(TINY, 4, 8))  # other shards are free


def test_claim_held_while_computing(url):
    first = CacheWriter.open(url, TINY, METADATA)
    second = CacheWriter.open(url, TINY, METADATA)
    with first.claim(1):
        assert (Path(url) / ".claims" / "shard-1").is_file()
        with pytest.raises(CacheError, match="another writer holds shard 1"):
            second.write_shard(1, make_rows(TINY, 4, 8))
        first.write_shard(1, make_rows(TINY, 4, 8))  # re-entrant for its holder
        assert (Path(url) / ".claims" / "shard-1").is_file()  # still held until the block ends
    assert not (Path(url) / ".claims" / "shard-1").exists()
    assert first.pending_shards() == [0, 2]


def test_stale_claim_of_a_dead_process_is_taken_over(url):
    writer = CacheWriter.open(url, TINY, METADATA)
    claim = _write_claim(url, 2, _dead_pid())
    writer.write_shard(2, make_rows(TINY, 8, 10))
    assert not claim.exists() and writer.pending_shards() == [0, 1]


def test_claims_from_other_hosts_and_unreadable_ones(url):
    writer = CacheWriter.open(url, TINY, METADATA)
    claim = _write_claim(url, 0, 1, host="elsewhere")
    with pytest.raises(CacheError, match="host elsewhere.*delete the claim file"):
        writer.write_shard(0, make_rows(TINY, 0, 4))
    claim.write_text("")  # a claim whose creator died before writing it ...
    with pytest.raises(CacheError, match="another writer holds shard 0"):
        writer.write_shard(0, make_rows(TINY, 0, 4))  # ... is respected while fresh
    os.utime(claim, (time.time() - 60, time.time() - 60))
    writer.write_shard(0, make_rows(TINY, 0, 4))  # ... and taken over once old
    assert not claim.exists()


def test_claims_dir_for_urls(tmp_path):
    assert claims_dir(str(tmp_path / "c.zarr")) == tmp_path / "c.zarr" / ".claims"
    assert claims_dir(f"file://{tmp_path}/c.zarr") == tmp_path / "c.zarr" / ".claims"
    assert claims_dir("s3://bucket/c.zarr") is None  # object stores: no O_EXCL, claims skipped
    assert claims_dir("simplecache::s3://bucket/c.zarr") is None


_WORKER = """
import sys
from kvkd.cache import CacheWriter
from tests.cache.helpers import METADATA, TINY, make_rows
url, index, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
writer = CacheWriter.open(url, TINY, METADATA)
for shard in writer.pending_shards(part=(index, count)):
    writer.write_shard(shard, make_rows(TINY, *TINY.shard_range(shard)))
writer.finalize()
"""


def test_parallel_writers_on_disjoint_parts(url):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, url, str(i), "2"], env=env, cwd=REPO) for i in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    writer = CacheWriter.open(url, TINY, METADATA)
    assert writer.pending_shards() == [] and writer.finalize()
    out, rows = CacheReader.open(url).read(slice(None)), full_rows(TINY)
    for k in ("slot_pos", "slot_valid", "cot_len", "answer_nll"):
        np.testing.assert_array_equal(out[k], rows[k])
    np.testing.assert_array_equal(out["keys"], rows["keys"].astype(np.float16).astype(np.float32))


_OPENER = """
import sys
from kvkd.cache import CacheWriter
from tests.cache.helpers import METADATA, TINY
CacheWriter.open(sys.argv[1], TINY, METADATA)
"""


def test_writers_creating_one_store_at_once_all_succeed(tmp_path):
    """Ranks start together: whichever creates the store first, the others join it (this raced
    into FileExistsError before: ~5% of processes under load)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for round_ in range(4):
        url = str(tmp_path / f"r{round_}.zarr")
        procs = [subprocess.Popen([sys.executable, "-c", _OPENER, url], env=env, cwd=REPO, stderr=subprocess.PIPE) for _ in range(3)]
        codes = [p.wait(timeout=60) for p in procs]
        assert codes == [0, 0, 0], [p.stderr.read().decode()[-300:] for p in procs]
