"""The run folder: atomic writes, torn log tails, locks (live, stale, re-entrant), resume option
comparison, file modes, finite checks."""

import json
import os
import stat
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file

from kvkd.train.rundir import (NonFiniteError, RunDir, RunFolderError, changed_options, check_finite, folder_lock, make_readable,
                               provenance, write_atomic)


def _entries(n):
    return [{"step": i + 1, "loss": 1.0 / (i + 1)} for i in range(n)]


def test_torn_last_line_is_dropped_with_a_warning_and_rewritten(tmp_path):
    run = RunDir(tmp_path)
    run.rewrite_log(_entries(3))
    with open(run.log_path, "a") as fh:
        fh.write('{"step": 4, "lo')  # a full disk / kill mid-line
    with pytest.warns(RuntimeWarning, match="torn last line"):
        assert run.read_log() == _entries(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run.truncate_log(2) == _entries(2)
    assert run.log_path.read_text() == "".join(json.dumps(e) + "\n" for e in _entries(2))


def test_corrupt_middle_line_names_the_file_and_line(tmp_path):
    run = RunDir(tmp_path)
    run.log_path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(RunFolderError, match=r"log\.jsonl line 2 is not JSON"):
        run.read_log()


def test_truncate_keeps_the_old_log_if_the_rewrite_fails(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.rewrite_log(_entries(4))
    before = run.log_path.read_text()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(RunFolderError, match="no space left"):
        run.truncate_log(2)
    assert run.log_path.read_text() == before  # the whole history survives
    assert [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]  # no temp file left


def test_write_atomic_replaces_and_gives_the_normal_mode(tmp_path):
    p = tmp_path / "x.json"
    write_atomic(p, "a")
    write_atomic(p, "b")
    assert p.read_text() == "b"
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask


def test_safetensors_made_readable_like_the_rest_of_the_run(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2)}, str(f))
    os.chmod(f, 0o600)
    make_readable(tmp_path)
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask


def test_lock_refuses_a_second_process_naming_the_holder_and_is_reentrant(tmp_path):
    code = ("import sys, time; from kvkd.train.rundir import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=f"in use by process {holder.pid}"):
            with folder_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock file is stale and simply taken over; nested use in one process is fine
    with folder_lock(tmp_path):
        with folder_lock(tmp_path):
            assert (tmp_path / ".lock").read_text() == str(os.getpid())
        child = subprocess.run([sys.executable, "-c", "import sys; from kvkd.train.rundir import folder_lock\nwith folder_lock(sys.argv[1]): pass", str(tmp_path)],
                               capture_output=True, text=True, env={**os.environ})
        assert child.returncode != 0 and f"in use by process {os.getpid()}" in child.stderr  # still ours for other processes


def test_train_into_a_locked_run_folder_is_refused_before_any_work(tmp_path):
    from kvkd.train.trainer import TrainConfig, train

    code = ("import sys, time; from kvkd.train.rundir import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=f"run folder .*run is in use by process {holder.pid}"):
            train(TrainConfig(caches=[str(tmp_path / "nope.zarr")], out=str(tmp_path / "run"), steps=2))
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]


def test_changed_options_names_each_difference_and_skips_resumable_ones():
    recorded = {"lr": 2e-4, "a1": 10.0, "steps": 4, "router": "fixed", "num_threads": 2, "layer_map": [0, 1]}
    current = {"lr": 1e-3, "a1": 0.0, "steps": 11, "router": "fixed", "num_threads": 1, "layer_map": (0, 1), "new_option": 3}
    diff = changed_options(recorded, current, {"lr": "--lr", "a1": "--a1"})
    assert diff == ["--lr 0.0002 (recorded) -> 0.001 (now)", "--a1 10.0 (recorded) -> 0.0 (now)"]


def test_check_finite_names_the_tensor():
    check_finite({"a": torch.ones(2), "i": torch.tensor([1])}, "x")
    with pytest.raises(NonFiniteError, match="checkpoint C holds non-finite .* in b"):
        check_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}, "checkpoint C")


def test_partial_checkpoints_are_removed(tmp_path):
    run = RunDir(tmp_path)
    for name in (".tmp-step-0000004", ".del-step-0000002", "step-0000003"):
        (run.checkpoints_path / name).mkdir(parents=True)
    good = run.checkpoints_path / "step-0000001"
    good.mkdir()
    (good / "state.json").write_text('{"step": 1}')
    assert sorted(p.name for p in run.remove_partial()) == [".del-step-0000002", ".tmp-step-0000004", "step-0000003"]
    assert [p.name for p in run.checkpoints_path.iterdir()] == ["step-0000001"] and run.steps_done() == 1


def test_provenance_records_versions_and_device():
    p = provenance("cpu")
    assert p["versions"]["torch"] == torch.__version__.split("+")[0] or p["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert set(p["versions"]) >= {"python", "kvkd", "torch", "transformers", "peft", "zarr", "numcodecs", "deepspeed"}
    assert p["device"]["type"] == "cpu" and p["device"]["torch_threads"] == torch.get_num_threads()
