"""A run's life on tiny models: prepare + fit, a finished run reported (not retrained), the summary
from the whole log, resume refusing other options, --fresh, divergence stopped and never
checkpointed, export/eval refusing NaN weights, a full disk, remote code only from the flag,
absolute paths."""

import json
import os
import stat
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvkd.train.rundir import NonFiniteError, RunFolderError
from kvkd.train.trainer import fit, latest_checkpoint, load_run, prepare, train
from tests.train.test_trainer import _cfg, caches  # noqa: F401  (module fixture)


def _log(run):
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def test_prepare_then_fit_and_a_finished_run_is_reported_not_retrained(caches, tmp_path, tiny_student):
    run = prepare(_cfg(caches, tmp_path / "run", tiny_student))
    assert run.start == 0 and not run.finished and run.trainee is not None
    first = fit(run)
    assert first.steps == 4 and first.steps_run == 4
    good = json.loads((tmp_path / "run" / "summary.json").read_text())
    log = _log(tmp_path / "run")
    assert good["final_loss"] == log[-1]["loss"]
    assert good["mean_weights"] == pytest.approx([sum(e["weights"][k] for e in log) / 4 for k in range(2)])
    # rerun with the same or fewer steps: finished, nothing loaded or trained, the summary stays right
    for steps in (4, 2):
        again = prepare(_cfg(caches, tmp_path / "run", tiny_student, steps=steps))
        assert again.finished and again.trainee is None and again.start == 4
        s = fit(again)
        assert s.steps == 4 and s.steps_run == 0 and s.final_loss == good["final_loss"] and s.mean_weights == good["mean_weights"]
    assert _log(tmp_path / "run") == log


def test_summary_after_a_resume_covers_the_whole_log(caches, tmp_path, tiny_student):
    train(_cfg(caches, tmp_path / "run", tiny_student, steps=2))
    s = train(_cfg(caches, tmp_path / "run", tiny_student, steps=4))
    log = _log(tmp_path / "run")
    assert [e["step"] for e in log] == [1, 2, 3, 4] and s.resumed_from == 2 and s.steps_run == 2
    assert s.mean_weights == pytest.approx([sum(e["weights"][k] for e in log) / 4 for k in range(2)])
    assert s.train_s == pytest.approx(sum(e["step_s"] for e in log))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["steps"] == 4 and [r["from_step"] for r in cfg["resumes"]] == [2]
    assert cfg["provenance"]["versions"]["torch"] and cfg["provenance"]["device"]["type"] == "cpu"


def test_resume_with_other_options_is_refused_before_anything_is_written(caches, tmp_path, tiny_student):
    train(_cfg(caches, tmp_path / "run", tiny_student, steps=2))
    before = {p: (tmp_path / "run" / p).read_text() for p in ("config.json", "log.jsonl", "summary.json")}
    with pytest.raises(RunFolderError, match=r"--a1 10\.0 \(recorded\) -> 0\.0 \(now\); --lr 0\.0002 \(recorded\) -> 0\.001 \(now\)\. .*--fresh"):
        train(_cfg(caches, tmp_path / "run", tiny_student, steps=3, lr=1e-3, a1=0.0))
    with pytest.raises(RunFolderError, match=r"--router \"similarity\" \(recorded\) -> \"learnable\""):
        train(_cfg(caches, tmp_path / "run", tiny_student, steps=3, router="learnable"))
    assert {p: (tmp_path / "run" / p).read_text() for p in before} == before
    # --fresh starts over with the new options
    s = train(_cfg(caches, tmp_path / "run", tiny_student, steps=3, lr=1e-3, a1=0.0, fresh=True))
    assert s.resumed_from == 0 and s.steps_run == 3 and len(_log(tmp_path / "run")) == 3
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 1e-3


def test_a_diverged_run_stops_and_is_never_checkpointed(caches, tmp_path, tiny_student):
    cfg = _cfg(caches, tmp_path / "run", tiny_student, lr=1e10, warmup_steps=0, steps=6, save_every=1, max_nonfinite_steps=1, router="fixed")
    with pytest.raises(NonFiniteError, match=r"2 non-finite step\(s\), more than --max-nonfinite-steps 1"):
        train(cfg)
    log = _log(tmp_path / "run")
    assert [e["skipped"] for e in log][-2:] == ["non-finite loss"] * 2 and log[0]["skipped"] is None
    for ckpt in (tmp_path / "run" / "checkpoints").glob("step-*"):
        for k, v in load_file(str(ckpt / "trainable.safetensors")).items():
            assert torch.isfinite(v).all(), (ckpt, k)
    # stop at once
    with pytest.raises(NonFiniteError, match="more than --max-nonfinite-steps 0"):
        train(_cfg(caches, tmp_path / "run0", tiny_student, lr=1e10, warmup_steps=0, steps=6, max_nonfinite_steps=0, router="fixed"))


def test_export_and_eval_refuse_nan_weights(caches, tmp_path, tiny_student, shared_data):
    from kvkd.eval.evaluate import EvalConfig, evaluate
    from kvkd.train.export import export_run

    train(_cfg(caches, tmp_path / "run", tiny_student, steps=1))
    f = latest_checkpoint(tmp_path / "run") / "trainable.safetensors"
    state = load_file(str(f))
    name = next(k for k in state if k.startswith("student.projection"))
    state[name][0] = float("nan")
    save_file(state, str(f))
    with pytest.raises(NonFiniteError, match=f"non-finite .* in {name[len('student.'):]}"):
        export_run(tmp_path / "run", tmp_path / "export")
    assert not (tmp_path / "export").exists()
    with pytest.raises(NonFiniteError):
        evaluate(EvalConfig(run=str(tmp_path / "run"), data=str(shared_data / "gsm8k" / "test.jsonl"), limit=2))


def test_disk_full_at_a_checkpoint_is_one_clear_error_and_resume_works(caches, tmp_path, tiny_student, monkeypatch):
    import kvkd.train.engines as engines

    real = engines.save_file
    calls = {"n": 0}

    def full_disk(state, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:815] . unexpected pos 66432 vs 66320")
        return real(state, path)

    monkeypatch.setattr(engines, "save_file", full_disk)
    with pytest.raises(RunFolderError, match=r"could not write .*\.tmp-step-0000004: no space left on the device"):
        train(_cfg(caches, tmp_path / "run", tiny_student))
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(engines, "save_file", real)
    s = train(_cfg(caches, tmp_path / "run", tiny_student))
    assert s.resumed_from == 2 and [e["step"] for e in _log(tmp_path / "run")] == [1, 2, 3, 4]


def test_checkpoint_files_have_the_runs_mode(caches, tmp_path, tiny_student):
    train(_cfg(caches, tmp_path / "run", tiny_student, steps=1))
    ckpt = latest_checkpoint(tmp_path / "run")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in list(ckpt.iterdir()) + [tmp_path / "run" / "config.json"]}
    assert len(set(modes.values())) == 1, modes


def test_recorded_trust_remote_code_is_ignored_and_paths_are_absolute(caches, tmp_path, tiny_student, monkeypatch):
    import kvkd.train.trainer as trainer

    monkeypatch.chdir(tiny_student.parent)
    train(_cfg(caches, tmp_path / "run", tiny_student.name, steps=1))  # a relative --student
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["student"] == str(tiny_student) and all(os.path.isabs(c) for c in cfg["caches"])
    cfg["trust_remote_code"] = True  # a folder received from someone else
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    seen = []
    real = trainer.load_model
    monkeypatch.setattr(trainer, "load_model", lambda spec, **kw: seen.append(kw["trust_remote_code"]) or real(spec, **kw))
    monkeypatch.chdir(tmp_path)  # another directory
    load_run(tmp_path / "run")
    load_run(tmp_path / "run", trust_remote_code=True)
    assert seen == [False, True]


def test_scalars_flatten_a_step_per_teacher():
    from kvkd.train.sinks import scalars

    entry = {"step": 3, "loss": 2.0, "codi": [0.5, 0.25], "weights": [0.75, 0.25], "router": {"temperature": 0.5, "name": "x"}, "fused": None, "skipped": None}
    assert scalars(entry) == {"loss": 2.0, "codi/t0": 0.5, "codi/t1": 0.25, "weights/t0": 0.75, "weights/t1": 0.25, "router/temperature": 0.5}


def test_unknown_or_missing_sinks_are_refused_with_the_fix():
    from kvkd.train.sinks import parse_report_to

    assert parse_report_to("none") == [] and parse_report_to("") == []
    with pytest.raises(ValueError, match="--report-to 'tensorbord': choose from none, tensorboard, wandb, trackio"):
        parse_report_to("tensorbord")
    try:
        import trackio  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"--report-to trackio needs the trackio package: pip install 'kvkd\[logging\]'"):
            parse_report_to("trackio")


def test_tensorboard_and_wandb_offline_get_every_step(caches, tmp_path, tiny_student, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_cfg(caches, run, tiny_student, steps=3, report_to="tensorboard,wandb"))
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]  # the FutureWarning kvkd triggered is gone
    log = _log(run)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "ce", "lr", "step_s", "codi/t0", "codi/t1", "kv/t1", "weights/t0", "weights/t1", "latent_norm", "embedding_norm"} <= tags
    for tag, key in (("loss", "loss"), ("weights/t1", None), ("latent_norm", "latent_norm")):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        want = [(e["step"], e["weights"][1] if key is None else e[key]) for e in log]
        assert [s for s, _ in got] == [1, 2, 3] and [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert all(e["latent_norm"] > 0 and e["embedding_norm"] > 0 for e in log)
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))  # wandb wrote its offline run


@pytest.mark.parametrize("spec", ["/no/such/student", "./student", "../runs/x/student", "runs/x/student"])
def test_a_missing_local_path_is_never_looked_up_on_the_hub(spec, monkeypatch):
    import transformers

    from kvkd.models import ModelLoadError, load_config, load_model

    def hub(*a, **k):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", hub)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", hub)
    for load in (load_model, load_config):
        with pytest.raises(ModelLoadError, match="no such model folder or file .* the hub is not asked"):
            load(spec)


def _cli_train(caches, run, tiny_student, steps=6):
    import sys

    cmd = [sys.executable, "-m", "kvkd.cli", "train", "--cache", caches["nl"], "--cache", caches["eq"], "--out", str(run), "--student", str(tiny_student),
           "--steps", str(steps), "--batch-size", "4", "--lora-r", "4", "--workers", "0", "--save-every", "2", "--warmup-steps", "1",
           "--router", "similarity", "--threads", "1"]
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    return cmd, env


TIMING = ("step_s", "examples_per_s")


@pytest.mark.slow
def test_training_killed_with_sigkill_at_random_points_resumes_to_the_uninterrupted_run(caches, tmp_path, tiny_student):
    """Fault injection: SIGKILL after a random number of logged steps (so mid-step, mid-checkpoint or
    mid-log-line), twice, then resume to the end. On CPU with one thread the resumed run's log
    (timings aside) and final weights equal the uninterrupted run's bitwise."""
    import random
    import signal
    import subprocess
    import time

    cmd, env = _cli_train(caches, tmp_path / "full", tiny_student)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    rng = random.Random(20261201)
    run = tmp_path / "killed"
    cmd, env = _cli_train(caches, run, tiny_student)
    kills = 0
    for _ in range(2):
        base = (run / "log.jsonl").read_text().count("\n") if (run / "log.jsonl").is_file() else 0
        if base >= 5:
            break
        at = min(5, base + rng.randint(1, 3))  # kill once the log holds this many steps
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            lines = (run / "log.jsonl").read_text().count("\n") if (run / "log.jsonl").is_file() else 0
            if lines >= at:
                time.sleep(rng.random() * 0.5)  # land anywhere in the next step or checkpoint
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.02)
        proc.wait(timeout=600)
    assert kills >= 1
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    strip = lambda log: [{k: v for k, v in e.items() if k not in TIMING} for e in log]  # noqa: E731
    assert strip(_log(run)) == strip(_log(tmp_path / "full"))
    a = load_file(str(latest_checkpoint(tmp_path / "full") / "trainable.safetensors"))
    b = load_file(str(latest_checkpoint(run) / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("step-")]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_loss"] == _log(tmp_path / "full")[-1]["loss"]


def test_export_has_a_model_card_and_loads_in_a_fresh_process(caches, tmp_path, tiny_student, shared_data):
    import subprocess
    import sys
    from pathlib import Path

    from kvkd.train.export import export_run

    train(_cfg(caches, tmp_path / "run", tiny_student, steps=2))
    (tmp_path / "run" / "cell.json").write_text(json.dumps({"evals": {"gsm8k": {"n": 40, "accuracy": 0.25, "ci_low": 0.14, "ci_high": 0.4, "mean_answer_nll": 1.5}}}))
    out = export_run(tmp_path / "run", tmp_path / "export")
    card = (out / "README.md").read_text()
    assert f"`{tiny_student}`" in card and "`similarity`" in card and "step 2 of 2" in card and "M = 4" in card
    assert caches["nl"] in card and caches["eq"] in card and "| gsm8k | 40 | 25.0% | 14.0-40.0% | 1.500 |" in card
    assert "kvkd eval --run THIS_FOLDER" in card
    mask = os.umask(0o022)
    os.umask(mask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~mask}  # safetensors too
    code = ("import json, sys, torch\n"
            "from transformers import AutoModelForCausalLM\n"
            "from kvkd.train.export import load_export\n"
            "lm = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "assert 'quantization_config' not in json.load(open(sys.argv[1] + '/config.json'))\n"
            "student, meta = load_export(sys.argv[1])\n"
            "print(json.dumps({'latents': meta['num_latents'], 'step': meta['step'], 'torch': meta['provenance']['versions']['torch'],\n"
            "                  'finite': all(bool(torch.isfinite(p).all()) for p in lm.parameters())}))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["latents"] == 4 and got["step"] == 2 and got["finite"] and got["torch"]


def test_a_null_quantization_config_is_dropped(tmp_path):
    from kvkd.train.export import _drop_null_keys

    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "llama", "quantization_config": None, "pad_token_id": None}))
    _drop_null_keys(p)
    assert json.loads(p.read_text()) == {"model_type": "llama", "pad_token_id": None}
