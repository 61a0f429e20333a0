"""DeepSpeed (CPU, one rank under torchrun) skips and counts a step with a finite loss but an
inf/NaN gradient like the plain engine, and a NaN loss in the middle of a gradient-accumulation
step leaves DeepSpeed's micro-step counter and gradient buffers in step: the updates after the
skipped step equal the plain engine's (issue 15)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvkd.pipeline.extract import ExtractConfig, extract
from kvkd.train import trainer
from kvkd.train.trainer import TrainConfig, latest_checkpoint

from tests.train.ds_fault_child import plant
from tests.train.test_engines import deepspeed_cpu  # noqa: F401  (session fixture: DS on the CPU accelerator)

CHILD = Path(__file__).with_name("ds_fault_child.py")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, shared_data, tiny_teacher):
    root = tmp_path_factory.mktemp("ds_nonfinite")
    (root / "train.jsonl").write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:8]) + "\n")
    extract(ExtractConfig(model=str(tiny_teacher), data=str(root / "train.jsonl"), out=str(root / "c.zarr"), slots=3, batch_size=8, trace_fallback="nl"))
    return str(root / "c.zarr")


def _opts(cache, student, out, **kw):
    return dict(caches=[cache], student=str(student), out=str(out), steps=3, batch_size=4, lora_r=4, num_workers=0, save_every=0,
                warmup_steps=0, lr=1e-2, router="fixed", num_threads=1, **kw)


def _plain(opts, fault, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(trainer, "build_trainee", trainer.build_trainee)  # restored after plant() replaces it
        plant(fault)
        trainer.train(TrainConfig(**opts))


def _deepspeed(env, opts, fault, stage, tmp_path):
    ds = tmp_path / f"ds{stage}.json"
    ds.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "gradient_clipping": "auto", "zero_optimization": {"stage": stage}}))
    counters = tmp_path / f"counters{stage}.json"
    arg = json.dumps({**opts, "deepspeed": str(ds), "fault": fault, "counters": str(counters)})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(CHILD), arg]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(counters.read_text())


def _log(run):
    return [json.loads(x) for x in (Path(run) / "log.jsonl").read_text().splitlines()]


def _assert_same_run(plain, ds):
    a, b = _log(plain), _log(ds)
    assert [e["skipped"] for e in b] == [e["skipped"] for e in a]
    assert [e["lr"] for e in b] == pytest.approx([e["lr"] for e in a], rel=1e-9)
    for ea, eb in zip(a, b):
        if ea["skipped"] is None:
            assert eb["loss"] == pytest.approx(ea["loss"], rel=1e-4), ea["step"]
    sa, sb = (json.loads((Path(r) / "summary.json").read_text()) for r in (plain, ds))
    assert sa["skipped_steps"] == sb["skipped_steps"] == 1 and sa["steps"] == sb["steps"] == 3
    wa, wb = (load_file(str(latest_checkpoint(Path(r)) / "trainable.safetensors")) for r in (plain, ds))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.isfinite(wb[k]).all(), k
        torch.testing.assert_close(wb[k], wa[k], atol=2e-4, rtol=1e-4)


@pytest.mark.slow  # a DeepSpeed launch per stage
@pytest.mark.parametrize("stage", [0, 2])
def test_a_non_finite_gradient_is_skipped_and_counted_like_the_plain_engine(deepspeed_cpu, cache, tiny_student, tmp_path, monkeypatch, stage):
    fault = {"kind": "grad", "call": 2}  # step 2: finite loss, inf gradient (by a hook)
    _plain(_opts(cache, tiny_student, tmp_path / "plain"), fault, monkeypatch)
    assert [e["skipped"] for e in _log(tmp_path / "plain")] == [None, "non-finite gradient", None]
    counters = _deepspeed(deepspeed_cpu, _opts(cache, tiny_student, tmp_path / "ds"), fault, stage, tmp_path)
    _assert_same_run(tmp_path / "plain", tmp_path / "ds")
    assert counters == {"micro_steps": 3, "global_steps": 3}


@pytest.mark.slow
def test_a_nan_loss_mid_accumulation_keeps_deepspeed_in_step(deepspeed_cpu, cache, tiny_student, tmp_path, monkeypatch):
    fault = {"kind": "loss", "call": 3}  # forward 3 = step 2's first of two micro-batches: the middle of an accumulation step
    opts = dict(grad_accum=2)
    _plain(_opts(cache, tiny_student, tmp_path / "plain", **opts), fault, monkeypatch)
    assert [e["skipped"] for e in _log(tmp_path / "plain")] == [None, "non-finite loss", None]
    counters = _deepspeed(deepspeed_cpu, _opts(cache, tiny_student, tmp_path / "ds", **opts), fault, 2, tmp_path)
    _assert_same_run(tmp_path / "plain", tmp_path / "ds")
    assert counters == {"micro_steps": 6, "global_steps": 3}  # 3 steps x 2 micro-batches: the boundary where it belongs
