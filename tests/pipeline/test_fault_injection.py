"""Fault injection: extraction SIGKILLed at random store writes (store creation, mid-shard,
checksums/flags, finalise), then resumed, equals an uninterrupted extraction array by array;
SIGINT/SIGTERM stop with one line and resume (issue 15). Bounded: a seeded sample of points."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvkd.cache.reader import CacheReader

ROOT = Path(__file__).resolve().parents[2]
KILLS = int(os.environ.get("KVKD_FAULT_KILLS", "6"))


def _run(opts, env_extra=None, count_file=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if count_file:
        env["KVKD_COUNT_FILE"] = str(count_file)
    return subprocess.run([sys.executable, "-m", "tests.pipeline.kill_child", json.dumps(opts)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data, tiny_teacher):
    root = tmp_path_factory.mktemp("faults")
    data = root / "train.jsonl"
    data.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:5]) + "\n")
    opts = dict(model=str(tiny_teacher), data=str(data), slots=4, batch_size=2, examples_per_shard=2, out=str(root / "ref.zarr"))
    done = _run(opts, count_file=root / "count")
    assert done.returncode == 0, done.stdout + done.stderr
    return root, opts, int((root / "count").read_text())


def _same_cache(a: str, b: str) -> None:
    ra, rb = CacheReader.open(a), CacheReader.open(b)
    assert rb.verify() == []
    x, y = ra.read(range(len(ra))), rb.read(range(len(rb)))
    for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    skip = {"created", "completed", "provenance"}
    assert {k: v for k, v in ra.metadata.items() if k not in skip} == {k: v for k, v in rb.metadata.items() if k not in skip}
    assert not list(Path(b).rglob("*.partial")) and not (Path(b) / ".claims").exists()


@pytest.mark.slow
def test_sigkill_at_random_writes_then_resume_equals_uninterrupted(setup):
    root, opts, writes = setup
    rng = random.Random(15)
    points = sorted({1, 2, writes} | set(rng.sample(range(3, writes), min(KILLS - 3, writes - 3))))  # creation, ..., finalise
    mismatches = []
    for k in points:
        out = str(root / f"kill{k}.zarr")
        killed = _run({**opts, "out": out}, {"KVKD_KILL_AT": str(k)})
        assert killed.returncode == -signal.SIGKILL, (k, killed.stdout + killed.stderr)
        resumed = _run({**opts, "out": out})
        if resumed.returncode != 0:
            mismatches.append((k, resumed.stdout + resumed.stderr))
            continue
        try:
            _same_cache(opts["out"], out)
        except AssertionError as e:
            mismatches.append((k, str(e)))
    print(f"fault injection: {len(points)} runs killed at writes {points} of {writes}; mismatches {len(mismatches)}")
    assert mismatches == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_signal_prints_one_line_and_resume_completes(setup, sig):
    root, opts, writes = setup
    out = str(root / f"sig{sig}.zarr")
    stopped = _run({**opts, "out": out}, {"KVKD_SIGNAL_AT": f"{sig}:{writes // 2}"})
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    lines = [line for line in stopped.stdout.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "rerun the same command to resume" in lines[0] and "at shard" in lines[0], stopped.stdout
    assert "Traceback" not in stopped.stdout + stopped.stderr
    claims = Path(out) / ".claims"
    assert not list(claims.glob("shard-*")) if claims.exists() else True  # claim released, also on SIGTERM
    assert _run({**opts, "out": out}).returncode == 0
    _same_cache(opts["out"], out)
