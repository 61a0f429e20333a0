"""``kvkd extract`` into S3 (moto's server): SIGKILL mid-way and resume equals an uninterrupted
extraction array by array; ``--out http://...`` is refused with one line before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kvkd.cache.reader import CacheReader
from kvkd.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _run(opts, env_extra=None, count_file=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if count_file:
        env["KVKD_COUNT_FILE"] = str(count_file)
    return subprocess.run([sys.executable, "-m", "tests.pipeline.kill_child", json.dumps(opts)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _same_cache(a: str, b: str) -> None:
    ra, rb = CacheReader.open(a), CacheReader.open(b)
    assert rb.verify() == []
    x, y = ra.read(range(len(ra))), rb.read(range(len(rb)))
    for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    skip = {"created", "completed", "provenance"}
    assert {k: v for k, v in ra.metadata.items() if k not in skip} == {k: v for k, v in rb.metadata.items() if k not in skip}


@pytest.mark.slow
def test_extract_to_s3_sigkill_then_resume_equals_uninterrupted(s3_url, tmp_path, shared_data, tiny_teacher):
    import s3fs

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:5]) + "\n")
    opts = dict(model=str(tiny_teacher), data=str(data), slots=4, batch_size=2, examples_per_shard=2, out=f"{s3_url}/ref.zarr")
    done = _run(opts, count_file=tmp_path / "count")
    assert done.returncode == 0, done.stdout + done.stderr
    writes = int((tmp_path / "count").read_text())
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for k in (writes // 2, writes - 1):  # mid-way (a shard's data), and the last writes (flags / status)
        out = f"{s3_url}/kill{k}.zarr"
        killed = _run({**opts, "out": out}, {"KVKD_KILL_AT": str(k)})
        assert killed.returncode == -signal.SIGKILL, (k, killed.stdout + killed.stderr)
        assert CacheReader.open(out, allow_incomplete=True).metadata["status"] == "incomplete"
        resumed = _run({**opts, "out": out})
        assert resumed.returncode == 0, (k, resumed.stdout + resumed.stderr)
        _same_cache(opts["out"], out)
        assert fs.find(out.removeprefix("s3://") + "/.claims") == []  # the dead writer's claim was taken over, then removed


def test_extract_to_http_refused_before_any_work(tmp_path):
    r = CliRunner().invoke(app, ["extract", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.jsonl"),
                                 "--out", "http://127.0.0.1:9/c.zarr"])
    assert r.exit_code != 0
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert any("--out http://127.0.0.1:9/c.zarr: HTTP(S) caches are read-only" in line for line in lines), r.output
    assert "Traceback" not in r.output and len(lines) == 1, r.output
