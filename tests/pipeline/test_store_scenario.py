"""A shared cache root used by two users' processes (different HOME and KVKD_HOME): one extracts,
the other's ``extract --out auto`` reuses the cache without loading the teacher or writing a byte;
a flipped byte in a chunk is shown as is by ``cache ls`` but stops ``cache cp`` (naming the chunk)."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import zarr

from kvkd.cache import zarr_adapter as za

REPO = Path(__file__).resolve().parents[2]
# the second user's process: the teacher must not be loaded (kvkd's CLI with load_model disabled)
NO_LOAD = ("import sys, kvkd.pipeline.extract as e\n"
           "def refuse(*a, **k):\n    raise SystemExit('the teacher was loaded')\n"
           "e.load_model = refuse\nfrom kvkd.cli import app\nsys.argv[0] = 'kvkd'\napp()\n")


def _env(tmp_path, user, root):
    home = tmp_path / user
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("KVKD_CACHE_ROOT",)}
    env.update(HOME=str(home), KVKD_HOME=str(home / "kvkd"), USER=user, LOGNAME=user, KVKD_CACHE_ROOT=str(root),
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", COLUMNS="250")
    return env


def _kvkd(env, *args, no_load=False):
    cmd = [sys.executable, "-c", NO_LOAD, *args] if no_load else [sys.executable, "-m", "kvkd.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=env["HOME"])


def _mtimes(folder):
    return {p: os.stat(p).st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_two_users_share_one_root(tmp_path, tiny_teacher, shared_data):
    root = tmp_path / "team_caches"
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:4]) + "\n")
    args = ["extract", "--model", str(tiny_teacher), "--data", str(data), "--out", "auto", "--slots", "3", "--examples-per-shard", "2", "--threads", "1"]
    alice = _kvkd(_env(tmp_path, "alice", root), *args)
    assert alice.returncode == 0, alice.stdout + alice.stderr
    before = _mtimes(root)

    bob = _kvkd(_env(tmp_path, "bob", root), *args, "--batch-size", "1", no_load=True)
    assert bob.returncode == 0, bob.stdout + bob.stderr
    line = re.search(r"reused cache ([0-9a-f]{16}) \((\S+)\) made by (\S+) at (\S+) with kvkd (\S+)", bob.stdout)
    assert line, bob.stdout
    key, name, who = line.group(1), line.group(2), line.group(3)
    assert who == f"alice@{socket.gethostname()}" and name.endswith(key[:8])
    assert _mtimes(root) == before  # nothing was written or rewritten
    assert not (tmp_path / "bob" / "kvkd").exists()  # nothing in bob's own kvkd folder either

    listing = _kvkd(_env(tmp_path, "bob", root), "cache", "ls", "--json")
    rows = json.loads(listing.stdout)
    assert [(r["name"], r["key"], r["status"], r["rows"], r["slots"]) for r in rows] == [(name, key, "complete", 4, 3)]

    cache = root / "caches" / key  # flip one byte in the first chunk of shard 1 of 'values'
    arr = zarr.open_group(str(cache), mode="r")["values"]
    obj = cache / "values" / za.shard_key(arr, 1)
    raw = bytearray(obj.read_bytes())
    raw[10] ^= 0x01
    obj.write_bytes(bytes(raw))
    table = _kvkd(_env(tmp_path, "bob", root), "cache", "ls")
    assert table.returncode == 0 and re.search(rf"{key}.*complete", table.stdout), table.stdout  # status from the flags, as is
    copy = _kvkd(_env(tmp_path, "bob", root), "cache", "cp", name, str(tmp_path / "bob" / "copy"))
    assert copy.returncode == 1, copy.stdout + copy.stderr
    assert "array 'values', example 2 (shard 1): unreadable chunk" in copy.stdout, copy.stdout
    assert not (tmp_path / "bob" / "copy" / "zarr.json").exists()

    refused = _kvkd(_env(tmp_path, "bob", root), "cache", "rm", name)
    assert refused.returncode == 2 and "pass --yes" in refused.stdout and cache.is_dir()
