"""Gradient accumulation (``--grad-accum``): batch 8 x 2 accumulation steps makes the same
update as batch 16 (within fp32 tolerance); the effective batch is recorded in the run; the
DeepSpeed config follows it."""

import json

import pytest
import torch
from safetensors.torch import load_file

from kvkd.pipeline.extract import ExtractConfig, extract
from kvkd.train.trainer import TrainConfig, latest_checkpoint, micro_batches, train


def test_micro_batches_scale_to_the_step_mean():
    rows = list(range(10))
    parts = micro_batches(rows, 4, 0, 1)
    assert [r for r, _ in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    x = {i: float(2**i) for i in rows}  # per-example losses: sum_k scale_k * mean_k(x) == mean(x)
    assert sum(s * sum(x[i] for i in r) / len(r) for r, s in parts) == pytest.approx(sum(x.values()) / 10)
    two = [micro_batches(rows, 4, rank, 2) for rank in (0, 1)]  # 2 ranks: their mean is the step mean too
    assert sum(s * sum(x[i] for i in r) / len(r) for p in two for r, s in p) / 2 == pytest.approx(sum(x.values()) / 10)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, shared_data, tiny_teacher):
    # 16 rows whose answers have two digits: every row has the same number of answer tokens, so the
    # token-weighted CE of a batch is its per-example mean and accumulation can match exactly
    root = tmp_path_factory.mktemp("accum")
    lines = [ln for ln in (shared_data / "gsm8k" / "train.jsonl").read_text().split("\n")[:400] if ln.strip() and len(json.loads(ln)["answer"]) == 2][:16]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    extract(ExtractConfig(model=str(tiny_teacher), data=str(root / "train.jsonl"), out=str(root / "c.zarr"), slots=3, batch_size=8))
    return str(root / "c.zarr")


@pytest.mark.slow  # three short trainings
def test_batch_8_x_2_accumulation_equals_batch_16(cache, tmp_path, tiny_student):
    common = dict(caches=[cache], student=str(tiny_student), steps=2, lora_r=4, num_workers=0, save_every=0, warmup_steps=0, lr=1e-2,
                  router="fixed", std_norm=False, grad_clip=1e9)
    train(TrainConfig(out=str(tmp_path / "b16"), batch_size=16, **common))
    train(TrainConfig(out=str(tmp_path / "b8x2"), batch_size=8, grad_accum=2, **common))
    train(TrainConfig(out=str(tmp_path / "b8"), batch_size=8, **common))  # no accumulation: another update
    a, b, c = (load_file(str(latest_checkpoint(tmp_path / n) / "trainable.safetensors")) for n in ("b16", "b8x2", "b8"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-4
    la, lb = ([json.loads(x)["loss"] for x in (tmp_path / n / "log.jsonl").read_text().splitlines()] for n in ("b16", "b8x2"))
    assert lb == pytest.approx(la, rel=1e-5)  # the logged loss is the mean over the whole step
    cfg = json.loads((tmp_path / "b8x2" / "config.json").read_text())
    assert cfg["effective_batch"] == 16 and cfg["grad_accum"] == 2 and cfg["batch_size"] == 8


def test_deepspeed_gradient_accumulation_follows_the_option(tmp_path):
    from types import SimpleNamespace

    from kvkd.train.engines import DeepSpeedEngine

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    ds = DeepSpeedEngine._config(SimpleNamespace(world_size=2), TrainConfig(deepspeed=str(path), batch_size=8, grad_accum=4))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 4, 4)
    path.write_text(json.dumps({"gradient_accumulation_steps": 1}))
    with pytest.raises(ValueError, match="gradient_accumulation_steps = 1 contradicts"):
        DeepSpeedEngine._config(SimpleNamespace(world_size=2), TrainConfig(deepspeed=str(path), batch_size=8, grad_accum=4))
