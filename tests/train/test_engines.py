"""Training engines: rank shares of a global batch, and DeepSpeed ZeRO-2/ZeRO-3 on 2 CPU ranks (gloo)
against the single-process run with the same global batch; ZeRO-3 resume, export and eval.

Tolerance: per-step losses agree within 0.5% (relative). They are not bitwise equal because a few
terms are statistics of the batch a process sees, not means of per-example terms: the answer CE is a
token-weighted mean over the process's rows and ``std_norm`` divides by a teacher std over them.
(With 2 ranks the first-step losses differ by about 0.1%.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvkd.eval.evaluate import EvalConfig, evaluate
from kvkd.pipeline.extract import ExtractConfig, extract
from kvkd.train.engines import check_batches_split, rank_rows
from kvkd.train.trainer import TrainConfig, latest_checkpoint, train

REPO = Path(__file__).resolve().parents[2]
RTOL = 5e-3


def test_rank_rows_split_a_global_batch_and_rescale_the_mean():
    rows = [7, 3, 5, 1, 9]
    (a, sa), (b, sb) = rank_rows(rows, 0, 2), rank_rows(rows, 1, 2)
    assert a == [7, 5, 9] and b == [3, 1]
    # per-example losses x: mean over ranks of scale_r * mean_r(x) == mean(x)
    x = {7: 1.0, 3: 2.0, 5: 4.0, 1: 8.0, 9: 16.0}
    ranks = [sa * sum(x[i] for i in a) / len(a), sb * sum(x[i] for i in b) / len(b)]
    assert sum(ranks) / 2 == pytest.approx(sum(x.values()) / 5)
    assert rank_rows(rows, 0, 1) == (rows, 1.0)


def test_batches_every_rank_can_share_are_required():
    check_batches_split(8, 4, 2)
    check_batches_split(9, 4, 1)
    with pytest.raises(ValueError, match="last batch of each epoch has 1"):
        check_batches_split(9, 4, 2)
    with pytest.raises(ValueError, match="batch-size >= 4"):
        check_batches_split(8, 2, 4)


def test_deepspeed_batch_settings_follow_the_global_batch(tmp_path):
    from types import SimpleNamespace

    from kvkd.train.engines import DeepSpeedEngine

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 2}}))
    cfg = TrainConfig(deepspeed=str(path), batch_size=8, grad_clip=1.5)
    ds = DeepSpeedEngine._config(SimpleNamespace(world_size=2), cfg)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 4, 1)
    assert ds["gradient_clipping"] == 1.5 and ds["zero_optimization"] == {"stage": 2}
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu = 2 contradicts --batch-size 8 on 2 ranks"):
        DeepSpeedEngine._config(SimpleNamespace(world_size=2), cfg)
    with pytest.raises(ValueError, match="not a multiple of the 3 ranks"):
        DeepSpeedEngine._config(SimpleNamespace(world_size=3), cfg)
    with pytest.raises(ValueError, match="no such file"):
        DeepSpeedEngine._config(SimpleNamespace(world_size=1), TrainConfig(deepspeed=str(tmp_path / "nope.json")))


def test_plain_engine_refuses_a_deepspeed_checkpoint(tmp_path):
    from kvkd.train.engines import PlainEngine

    ckpt = tmp_path / "checkpoints" / "step-0000002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 2, "engine": "deepspeed"}))
    engine = PlainEngine(torch.nn.Linear(2, 2), TrainConfig(), torch.device("cpu"))
    with pytest.raises(ValueError, match="resume it with --deepspeed"):
        engine.load(ckpt)


def test_resolve_device():
    from kvkd.models import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu", 0 if torch.cuda.is_available() else None)
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.fixture(scope="module")
def caches(tmp_path_factory, shared_data, tiny_teacher):
    root = tmp_path_factory.mktemp("caches")
    data = root / "train.jsonl"
    data.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:8]) + "\n")
    out = []
    for trace in ("nl", "equations"):
        extract(ExtractConfig(model=str(tiny_teacher), data=str(data), out=str(root / f"{trace}.zarr"), slots=4, batch_size=4, trace=trace, trace_fallback="nl"))
        out.append(str(root / f"{trace}.zarr"))
    return out, data


OPTS = dict(steps=4, batch_size=4, lora_r=4, num_workers=0, save_every=2, warmup_steps=1, router="similarity", num_threads=1)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(caches, tiny_student, tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    train(TrainConfig(caches=caches[0], out=str(run), student=str(tiny_student), **OPTS))
    return run


@pytest.fixture(scope="session")
def deepspeed_cpu(tmp_path_factory):
    """DeepSpeed on the CPU accelerator, its shared-memory comm extension built once per session
    (kept in TORCH_EXTENSIONS_DIR when set, so CI builds it once per run)."""
    pytest.importorskip("deepspeed")
    os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load()  # compile now, not in two racing ranks
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _ds_config(tmp_path: Path, shipped: str, **zero) -> Path:
    cfg = json.loads((REPO / "kvkd" / "configs" / shipped).read_text())
    cfg["zero_optimization"].update(zero)
    path = tmp_path / shipped
    path.write_text(json.dumps(cfg))
    return path


def _launch(env: dict, caches, tiny_student, run: Path, ds_config: Path, **kw) -> None:
    """``torchrun --nproc_per_node 2 -m kvkd.cli train --deepspeed ...`` (2 CPU ranks, gloo)."""
    opts = {**OPTS, **kw}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kvkd.cli", "train",
           "--deepspeed", str(ds_config), "--out", str(run), "--student", str(tiny_student), "--steps", str(opts["steps"]),
           "--batch-size", str(opts["batch_size"]), "--lora-r", str(opts["lora_r"]), "--workers", "0", "--save-every", str(opts["save_every"]),
           "--warmup-steps", str(opts["warmup_steps"]), "--router", opts["router"], "--threads", "1"]
    for c in caches:
        cmd += ["--cache", c]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _assert_matches(single: Path, run: Path) -> None:
    a, b = _log(single), _log(run)
    assert [e["step"] for e in b] == [e["step"] for e in a]
    for ea, eb in zip(a, b):
        assert eb["loss"] == pytest.approx(ea["loss"], rel=RTOL), (ea["step"], ea["loss"], eb["loss"])
        assert eb["ce"] == pytest.approx(ea["ce"], rel=RTOL)
        assert eb["lr"] == pytest.approx(ea["lr"], rel=1e-9)
        assert eb["weights"] == pytest.approx(ea["weights"], abs=1e-2)
    # the trained tensors (LoRA, projection, <bot>/<eot>, aligners, router) agree too
    wa = load_file(str(latest_checkpoint(single) / "trainable.safetensors"))
    wb = load_file(str(latest_checkpoint(run) / "trainable.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=2e-3, rtol=0), (k, (wa[k] - wb[k]).abs().max())


@pytest.mark.slow
def test_zero2_two_ranks_match_the_single_process_run(deepspeed_cpu, caches, tiny_student, single, tmp_path):
    run = tmp_path / "z2"
    _launch(deepspeed_cpu, caches[0], tiny_student, run, _ds_config(tmp_path, "ds_zero2.json"))
    _assert_matches(single, run)
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert state == {"step": 4, "engine": "deepspeed", "world_size": 2, "zero_stage": 2}
    assert json.loads((run / "config.json").read_text())["engine"]["zero_stage"] == 2


@pytest.mark.slow
def test_zero3_two_ranks_resume_export_and_eval(deepspeed_cpu, caches, tiny_student, single, tmp_path):
    run = tmp_path / "z3"
    # every parameter partitioned (the tiny model's would otherwise stay whole under the persistence threshold)
    cfg = _ds_config(tmp_path, "ds_zero3.json", stage3_param_persistence_threshold=0)
    _launch(deepspeed_cpu, caches[0], tiny_student, run, cfg, steps=2)  # stops after step 2 ...
    _launch(deepspeed_cpu, caches[0], tiny_student, run, cfg, steps=4)  # ... and resumes from its DeepSpeed checkpoint
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == 2
    assert len(list((latest_checkpoint(run)).glob("zero_pp_rank_*_optim_states.pt"))) == 2  # optimiser partitions
    _assert_matches(single, run)

    from transformers import AutoModelForCausalLM

    from typer.testing import CliRunner

    from kvkd.cli import app

    out = tmp_path / "export"
    res = CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(out)])
    assert res.exit_code == 2 and "not empty" in res.output
    lm = AutoModelForCausalLM.from_pretrained(out)  # a plain Hugging Face folder (LoRA merged)
    assert not any("lora" in name for name, _ in lm.named_parameters())
    data = caches[1]
    by_run = evaluate(EvalConfig(run=str(run), data=str(data), limit=4, batch_size=4, out=str(tmp_path / "eval-a")))
    by_export = evaluate(EvalConfig(run=str(out), data=str(data), limit=4, batch_size=4, out=str(tmp_path / "eval-b")))
    assert by_export.n == by_run.n == 4
    assert by_export.mean_answer_nll == pytest.approx(by_run.mean_answer_nll, rel=1e-3)


def test_deepspeed_needs_its_file_and_a_launcher_before_anything_runs(tmp_path):
    from kvkd.train.engines import check_deepspeed_launch

    cfg = TrainConfig(deepspeed=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match=r"--deepspeed .*nope.json: no such file"):
        check_deepspeed_launch(cfg, env={"LOCAL_RANK": "0"})
    (tmp_path / "ds.json").write_text("{}")
    cfg = TrainConfig(deepspeed=str(tmp_path / "ds.json"))
    with pytest.raises(ValueError, match=r"--deepspeed needs a distributed launcher: run `torchrun --nproc_per_node N"):
        check_deepspeed_launch(cfg, env={})
    check_deepspeed_launch(cfg, env={"LOCAL_RANK": "0", "RANK": "0"})  # under torchrun: fine
    check_deepspeed_launch(TrainConfig(), env={})  # no DeepSpeed: nothing to check
