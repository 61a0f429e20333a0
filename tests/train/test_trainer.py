"""The training recipe on tiny models: caches checked, losses logged, resume reproduces an
uninterrupted run, checkpoints hold no pickle."""

import json

import pytest
import torch
from safetensors.torch import load_file

from kvkd.cache.errors import CacheMismatchError
from kvkd.pipeline.extract import ExtractConfig, extract
from kvkd.train.trainer import TrainConfig, latest_checkpoint, load_run, train


@pytest.fixture(scope="module")
def caches(tmp_path_factory, shared_data, tiny_teacher):
    root = tmp_path_factory.mktemp("caches")
    data = root / "train.jsonl"
    data.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:8]) + "\n")
    out = {}
    for name, kw in {"nl": dict(trace="nl"), "eq": dict(trace="equations"), "m3": dict(trace="nl", slots=3), "rows6": dict(trace="nl", limit=6)}.items():
        opts = dict(model=str(tiny_teacher), data=str(data), out=str(root / f"{name}.zarr"), slots=4, batch_size=4, trace_fallback="nl")
        opts.update(kw)
        cfg = ExtractConfig(**opts)
        extract(cfg)
        out[name] = str(root / f"{name}.zarr")
    return out


def _cfg(cache_paths, out, tiny_student, **kw):
    base = dict(caches=[cache_paths["nl"], cache_paths["eq"]], out=str(out), student=str(tiny_student), steps=4, batch_size=4, lora_r=4,
                num_workers=0, save_every=2, warmup_steps=1, router="similarity")
    base.update(kw)
    return TrainConfig(**base)


def test_train_logs_every_term_and_weights(caches, tmp_path, tiny_student):
    summary = train(_cfg(caches, tmp_path / "run", tiny_student))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    for e in log:
        assert len(e["codi"]) == 2 and len(e["kv"]) == 2 and len(e["weights"]) == 2
        assert abs(sum(e["weights"]) - 1) < 1e-5
        assert e["loss"] >= e["ce"] > 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["router"] == "similarity" and cfg["latents"] == 4
    assert [t["trace"] for t in cfg["teachers"]] == ["nl", "equations"]
    assert all(t["tokenizer_shared_with_student"] for t in cfg["teachers"])
    assert summary.steps == 4 and summary.resumed_from == 0


def test_resume_reproduces_uninterrupted_run(caches, tmp_path, tiny_student):
    train(_cfg(caches, tmp_path / "full", tiny_student, num_workers=1))
    train(_cfg(caches, tmp_path / "part", tiny_student, steps=2))
    resumed = train(_cfg(caches, tmp_path / "part", tiny_student, steps=4))
    assert resumed.resumed_from == 2
    full = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    part = [json.loads(x) for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [round(e["loss"], 4) for e in full] == [round(e["loss"], 4) for e in part]
    a = load_file(str(latest_checkpoint(tmp_path / "full") / "trainable.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "part") / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    # the optimiser state loads without pickle code execution
    torch.load(latest_checkpoint(tmp_path / "part") / "optimizer.pt", weights_only=True)


def test_load_run_rebuilds_the_trained_student(caches, tmp_path, tiny_student):
    train(_cfg(caches, tmp_path / "run", tiny_student, steps=2))
    student, resolved = load_run(tmp_path / "run")
    saved = load_file(str(latest_checkpoint(tmp_path / "run") / "trainable.safetensors"))
    own = dict(student.named_parameters())
    assert torch.equal(own["projection.net.0.weight"], saved["student.projection.net.0.weight"])
    assert resolved["steps"] == 2


@pytest.mark.parametrize("other,field", [("m3", "compression.slots"), ("rows6", "dataset.fingerprint")])
def test_mismatched_caches_are_refused_naming_the_field(caches, tmp_path, tiny_student, other, field):
    with pytest.raises(CacheMismatchError, match=field.replace(".", r"\.")):
        train(_cfg(caches, tmp_path / "bad", tiny_student, caches=[caches["nl"], caches[other]]))


def test_training_data_must_match_the_caches(caches, tmp_path, tiny_student, shared_data):
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[1:9]) + "\n")
    with pytest.raises(CacheMismatchError, match="fingerprint"):
        train(_cfg(caches, tmp_path / "bad", tiny_student, data=str(other)))


def test_fixed_router_weights_and_unknown_router(caches, tmp_path, tiny_student):
    train(_cfg(caches, tmp_path / "fixed", tiny_student, steps=1, router="fixed", router_options={"weights": [3, 1]}))
    e = json.loads((tmp_path / "fixed" / "log.jsonl").read_text().splitlines()[0])
    assert e["weights"] == pytest.approx([0.75, 0.25])
    with pytest.raises(KeyError, match="similarity"):
        train(_cfg(caches, tmp_path / "unknown", tiny_student, router="nope"))


def test_training_rows_that_are_not_the_cached_rows_are_refused_clearly(caches, tmp_path, tiny_student):
    with pytest.raises(CacheMismatchError, match=r"\(.*, offset 0, 4 rows\) are not the rows the caches hold \(.*, offset 0, 8 rows\)\. Training uses exactly the cached rows"):
        train(_cfg(caches, tmp_path / "run", tiny_student, limit=4))
    assert not (tmp_path / "run" / "log.jsonl").exists()
