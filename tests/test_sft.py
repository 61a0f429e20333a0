"""``kvkd sft`` end to end on a tiny model: CoT-SFT lowers the CoT loss, the loss covers the
target tokens only, No-CoT targets are the answer alone, the exported folder loads with plain
transformers and extracts; a run killed after k steps and rerun equals the uninterrupted run
(bitwise on CPU), with the resume rules of ``kvkd train``; ZeRO-1/2 match the plain engine."""

import json
import os
import subprocess
import sys

import pytest
import torch

from kvkd.data import load_examples
from kvkd.sft import SFTConfig, sft, sft_texts, target_loss, tokenize_sft


@pytest.fixture(scope="module")
def rows(tmp_path_factory, shared_data):
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    path.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().split("\n")[:8]) + "\n")
    return path


def test_targets_and_masks(rows, tiny_teacher):
    from transformers import AutoTokenizer

    ex = load_examples(str(rows)).examples[0]
    prompt, target = sft_texts(ex, "cot")
    assert prompt == ex.question + "\n" and target.endswith("\nThe answer is: 72") and "48/2 = 24" in target
    assert sft_texts(ex, "nocot") == (ex.question + "\nThe answer is:", " 72")
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    b = tokenize_sft(tok, [sft_texts(ex, "nocot"), sft_texts(ex, "cot")], 1024)
    n_prompt = len(tok(ex.question + "\nThe answer is:")["input_ids"])
    kept = b["labels"][0][b["labels"][0] != -100].tolist()
    assert kept == tok(" 72", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # the answer and EOS only
    assert (b["labels"][0, :n_prompt] == -100).all() and b["attention_mask"][0].sum() < b["attention_mask"][1].sum()


@pytest.mark.slow  # a few dozen tiny steps plus an extraction
def test_cot_sft_lowers_the_cot_loss_and_exports_a_folder(rows, tmp_path, tiny_teacher):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvkd.cache.reader import CacheReader
    from kvkd.pipeline.extract import ExtractConfig, extract

    examples = load_examples(str(rows)).examples
    base = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    before = target_loss(base, tok, examples, "cot")
    s = sft(SFTConfig(model=str(tiny_teacher), data=str(rows), out=str(tmp_path / "run"), mode="cot", steps=12, batch_size=4, lr=3e-3,
                      warmup_steps=0, lora_r=8))
    tuned = AutoModelForCausalLM.from_pretrained(s.model_dir)  # plain transformers, LoRA merged
    after = target_loss(tuned, AutoTokenizer.from_pretrained(s.model_dir), examples, "cot")
    assert after < before - 0.1, (before, after)  # a random tiny model starts near ln(49k) = 10.8 nats; 12 LoRA steps cut it by ~0.25
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and log[-1]["loss"] < log[0]["loss"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["effective_batch"] == 4
    assert not any("lora" in k for k in tuned.state_dict())
    extract(ExtractConfig(model=s.model_dir, data=str(rows), out=str(tmp_path / "c.zarr"), slots=3, batch_size=4))
    assert CacheReader.open(str(tmp_path / "c.zarr")).metadata["status"] == "complete"
    assert sft(SFTConfig(model=str(tiny_teacher), data=str(rows), out=str(tmp_path / "run"), mode="cot", steps=12, batch_size=4, lr=3e-3,
                         warmup_steps=0, lora_r=8)).steps_run == 0  # a rerun of a finished run trains nothing


class Killed(Exception):
    pass


def _kill_at(step: int):
    def on_step(entry):
        if entry.step == step:
            raise Killed  # as a kill after step `step` was logged, before its checkpoint
    return on_step


RESUME = dict(mode="cot", steps=4, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=1, lora_r=4, save_every=2, seed=3)


def _weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def test_sft_killed_after_three_steps_resumes_to_the_uninterrupted_run(rows, tmp_path, tiny_teacher):
    cfg = lambda run, **kw: SFTConfig(model=str(tiny_teacher), data=str(rows), out=str(tmp_path / run), **{**RESUME, **kw})  # noqa: E731
    whole = sft(cfg("whole"))
    with pytest.raises(Killed):
        sft(cfg("killed"), on_step=_kill_at(3))
    run = tmp_path / "killed"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"] and not (run / "model").exists()
    assert len((run / "log.jsonl").read_text().splitlines()) == 3  # step 3 logged, not checkpointed: it is redone
    resumed = sft(cfg("killed"))
    assert (resumed.resumed_from, resumed.steps_run, resumed.steps) == (2, 2, 4)
    log = lambda r: [json.loads(x) for x in (tmp_path / r / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert [(e["step"], e["loss"], e["lr"]) for e in log("killed")] == [(e["step"], e["loss"], e["lr"]) for e in log("whole")]  # bitwise
    assert resumed.first_loss == whole.first_loss and resumed.final_loss == whole.final_loss
    a, b = _weights(tmp_path / "whole"), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the exported (merged) weights, bitwise
    assert json.loads((run / "config.json").read_text())["resumes"][0]["from_step"] == 2


def test_sft_sigterm_is_one_line_and_the_rerun_resumes(rows, tmp_path, tiny_teacher, monkeypatch):
    import signal

    from typer.testing import CliRunner

    import kvkd.sft as sft_mod
    from kvkd.cli import app

    real, calls = sft_mod.tokenize_sft, []

    def tokenize(*a, **kw):  # step 3's batch: as a scheduler's SIGTERM would arrive
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(sft_mod, "tokenize_sft", tokenize)
    argv = ["sft", "--model", str(tiny_teacher), "--data", str(rows), "--out", str(tmp_path / "run"), "--mode", "cot", "--steps", "4",
            "--batch-size", "2", "--lora-r", "4", "--save-every", "2"]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 130 and "Traceback" not in r.output, r.output
    assert "interrupted at step 2 of" in r.output and "it resumes from the checkpoint of step 2" in r.output.replace("\n", " "), r.output
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "summary.json").exists()
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0 and json.loads((tmp_path / "run" / "config.json").read_text())["resumes"][0]["from_step"] == 2, r.output


@pytest.mark.slow  # seven short runs in one folder
def test_sft_resume_rules(rows, tmp_path, tiny_teacher):
    from kvkd.train.rundir import RunFolderError

    data = tmp_path / "rows.jsonl"
    data.write_text(rows.read_text())
    cfg = lambda **kw: SFTConfig(model=str(tiny_teacher), data=str(data), out=str(tmp_path / "run"), **{**RESUME, "steps": 2, **kw})  # noqa: E731
    sft(cfg())
    with pytest.raises(RunFolderError, match=r'--lr 0.003 \(recorded\) -> 0.01 \(now\).*--fresh'):
        sft(cfg(lr=1e-2, steps=3))
    with pytest.raises(RunFolderError, match=r'--mode "cot" \(recorded\) -> "nocot" \(now\)'):
        sft(cfg(mode="nocot"))
    data.write_text("".join(rows.read_text().splitlines(keepends=True)[:-1]))  # same options, other rows: the file changed
    with pytest.raises(RunFolderError, match="other rows .*data fingerprint"):
        sft(cfg())
    data.write_text(rows.read_text())
    again = sft(cfg())
    assert again.steps_run == 0 and again.steps == 2 and again.final_loss == json.loads((tmp_path / "run" / "summary.json").read_text())["final_loss"]
    grown = sft(cfg(steps=3))  # --steps may grow
    assert (grown.resumed_from, grown.steps_run, grown.steps) == (2, 1, 3)
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 3
    fresh = sft(cfg(mode="nocot", fresh=True))  # --fresh starts the folder over, with other options
    assert (fresh.resumed_from, fresh.steps, fresh.mode) == (0, 2, "nocot")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["mode"] == "nocot"
    import shutil

    shutil.rmtree(tmp_path / "run" / "model")  # killed while exporting: the finished run exports again from its checkpoint
    assert sft(cfg(mode="nocot")).steps_run == 0 and (tmp_path / "run" / "model" / "config.json").is_file()


def test_sft_batch_4_equals_batch_2_times_2_accumulation_steps(rows, tmp_path, tiny_teacher):
    """The step's loss is its token mean whatever the split: same losses and LoRA tensors within fp32 tolerance."""
    from safetensors.torch import load_file

    runs = {}
    for name, batch, accum in (("b4", 4, 1), ("b2x2", 2, 2)):
        sft(SFTConfig(model=str(tiny_teacher), data=str(rows), out=str(tmp_path / name), **{**RESUME, "steps": 2, "batch_size": batch, "grad_accum": accum}))
        runs[name] = ([json.loads(x)["loss"] for x in (tmp_path / name / "log.jsonl").read_text().splitlines()],
                      load_file(str(tmp_path / name / "checkpoints" / "step-0000002" / "trainable.safetensors")))
    (la, wa), (lb, wb) = runs["b4"], runs["b2x2"]
    assert lb == pytest.approx(la, rel=1e-6, abs=0)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0) for k in wa)


def test_sft_into_a_locked_run_folder_is_refused(rows, tmp_path, tiny_teacher):
    from kvkd.train.rundir import RunFolderError

    code = ("import sys, time; from kvkd.train.rundir import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=f"in use by process {holder.pid}"):
            sft(SFTConfig(model=str(tiny_teacher), data=str(rows), out=str(tmp_path / "run"), steps=1))
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]


from tests.train.test_engines import REPO, RTOL, deepspeed_cpu  # noqa: E402,F401  (session fixture: DeepSpeed on the CPU accelerator)

DS = dict(steps=4, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=1, lora_r=4, save_every=2, seed=3)


def _ds_sft(env: dict, rows, model, run, stage: int, tmp_path, **kw) -> None:
    """``torchrun --nproc_per_node 2 -m kvkd.cli sft --deepspeed ds_zeroN.json ...`` (2 CPU ranks, gloo)."""
    ds = json.loads((REPO / "kvkd" / "configs" / f"ds_zero{stage}.json").read_text())
    ds["gradient_accumulation_steps"] = "auto"  # follows --grad-accum
    path = tmp_path / f"ds_zero{stage}.json"
    path.write_text(json.dumps(ds))
    opts = {**DS, **kw}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kvkd.cli", "sft", "--deepspeed", str(path),
           "--model", str(model), "--data", str(rows), "--out", str(run), "--threads", "1", "--mode", "cot"]
    for key, value in opts.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.slow  # three two-rank DeepSpeed launches
def test_sft_under_zero1_and_zero2_matches_the_plain_engine_and_resumes(deepspeed_cpu, rows, tmp_path, tiny_teacher):  # noqa: F811
    from safetensors.torch import load_file

    plain = sft(SFTConfig(model=str(tiny_teacher), data=str(rows), out=str(tmp_path / "plain"), mode="cot", **DS))
    log = lambda r: [json.loads(x) for x in (tmp_path / r / "log.jsonl").read_text().splitlines()]  # noqa: E731
    _ds_sft(deepspeed_cpu, rows, tiny_teacher, tmp_path / "z1", 1, tmp_path)
    _ds_sft(deepspeed_cpu, rows, tiny_teacher, tmp_path / "z2", 2, tmp_path, steps=2)  # stops after step 2 ...
    _ds_sft(deepspeed_cpu, rows, tiny_teacher, tmp_path / "z2", 2, tmp_path)  # ... and resumes from its DeepSpeed checkpoint
    assert json.loads((tmp_path / "z2" / "summary.json").read_text())["resumed_from"] == 2
    for run, stage in (("z1", 1), ("z2", 2)):
        assert json.loads((tmp_path / run / "config.json").read_text())["engine"] == {"kind": "deepspeed", "world_size": 2, "zero_stage": stage, "precision": "float32"}
        assert [e["step"] for e in log(run)] == [1, 2, 3, 4]
        for a, b in zip(log("plain"), log(run)):
            assert b["loss"] == pytest.approx(a["loss"], rel=RTOL) and b["lr"] == pytest.approx(a["lr"], rel=1e-9), (run, a, b)
        # the update: LoRA's B matrices start at zero, so B is what 4 steps learnt. Adam turns a near-zero gradient
        # into a +-lr step, so summation-order noise moves single elements by up to ~lr per step: compare norms
        wa = load_file(str(tmp_path / "plain" / "checkpoints" / "step-0000004" / "trainable.safetensors"))
        wb = load_file(str(tmp_path / run / "checkpoints" / "step-0000004" / "trainable.safetensors"))
        assert wa.keys() == wb.keys()
        B = [k for k in wa if "lora_B" in k]
        diff = sum(float((wa[k] - wb[k]).norm() ** 2) for k in B) ** 0.5 / sum(float(wa[k].norm() ** 2) for k in B) ** 0.5
        assert diff < 0.05, (run, diff)
        assert (tmp_path / run / "model" / "model.safetensors").is_file()
    assert plain.final_loss < plain.first_loss
