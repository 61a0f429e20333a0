"""Routers, fusion modes and the extra losses inside the training recipe (tiny models).

Includes the behaviour check of issue 3: with three teachers, one corrupted (its cached KV
and hidden states sign-flipped relative to the others, and a higher cached answer NLL, as a
broken teacher would have), ``govern``, ``ae-kd`` and ``ca-mkd`` give it clearly less weight
than the two good ones over a short run; ``fixed`` does not.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from safetensors.torch import load_file

from kvkd.pipeline.extract import ExtractConfig, extract
from kvkd.train.trainer import TrainConfig, latest_checkpoint, train


def _corrupt(src: str, dst: str, *, mode: str, nll_shift: float = 2.0, seed: int = 0) -> str:
    """Copy a cache and corrupt its teacher tensors in place (same rows, same metadata)."""
    shutil.copytree(src, dst)
    group = zarr.open_group(dst, mode="r+", zarr_format=3)
    rng = np.random.default_rng(seed)
    for name in ("keys", "values", "hidden"):
        arr = group[name]
        data = np.asarray(arr[:]).astype(np.float32)
        data = -data if mode == "flip" else rng.normal(0, data.std(), data.shape)
        arr[:] = data.astype(arr.dtype)
    group["answer_nll"][:] = np.asarray(group["answer_nll"][:]) + nll_shift
    # a teacher that is wrong, not a damaged file: record the rewritten shards' checksums as a writer would
    from kvkd.cache import integrity

    names = group.attrs["checksums"]["arrays"]
    table = group[integrity.CHECKSUM_ARRAY]
    for shard in range(table.shape[0]):
        table[shard] = integrity.shard_digests({n: group[n] for n in names}, names, shard)
    return dst


@pytest.fixture(scope="module")
def caches(tmp_path_factory, shared_data, tiny_teacher):
    root = tmp_path_factory.mktemp("route_caches")
    data = root / "train.jsonl"
    data.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:16]) + "\n")
    out = {}
    for name, trace in (("nl", "nl"), ("eq", "equations")):
        extract(ExtractConfig(model=str(tiny_teacher), data=str(data), out=str(root / f"{name}.zarr"), slots=4, batch_size=8, trace=trace, trace_fallback="nl"))
        out[name] = str(root / f"{name}.zarr")
    out["flip"] = _corrupt(out["nl"], str(root / "flip.zarr"), mode="flip")
    out["noise"] = _corrupt(out["nl"], str(root / "noise.zarr"), mode="noise")
    return out


def _cfg(caches, out, student, teachers=("nl", "eq"), **kw):
    base = dict(caches=[caches[t] for t in teachers], out=str(out), student=str(student), steps=3, batch_size=4, lora_r=4,
                num_workers=0, save_every=0, warmup_steps=1, router="fixed")
    base.update(kw)
    return TrainConfig(**base)


def _log(run):
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("router,opts", [
    ("govern", {}), ("grad-cosine", {}), ("grad-cosine", {"space": "parameter", "momentum": 0.5}), ("ae-kd", {}),
    ("ca-mkd", {}), ("difficulty", {}), ("mtkd-rl", {"warmup_steps": 1, "update_every": 1}),
])
def test_every_router_trains_and_logs(caches, tmp_path, tiny_student, router, opts):
    summary = train(_cfg(caches, tmp_path / "run", tiny_student, steps=2, router=router, router_options=opts))
    log = _log(tmp_path / "run")
    assert [e["step"] for e in log] == [1, 2] and summary.steps == 2
    for e in log:
        assert np.isfinite(e["loss"]) and abs(sum(e["weights"]) - 1) < 1e-5 and min(e["weights"]) >= 0


@pytest.mark.parametrize("router,opts", [("mtkd-rl", {"warmup_steps": 1, "update_every": 1}), ("grad-cosine", {"momentum": 0.5}), ("difficulty", {})])
def test_router_state_resumes_exactly(caches, tmp_path, tiny_student, router, opts):
    kw = dict(router=router, router_options=opts, save_every=2)
    train(_cfg(caches, tmp_path / "full", tiny_student, steps=4, **kw))
    train(_cfg(caches, tmp_path / "part", tiny_student, steps=2, **kw))
    train(_cfg(caches, tmp_path / "part", tiny_student, steps=4, **kw))
    full, part = _log(tmp_path / "full"), _log(tmp_path / "part")
    assert [round(e["loss"], 5) for e in full] == [round(e["loss"], 5) for e in part]
    assert np.allclose([e["weights"] for e in full], [e["weights"] for e in part], atol=1e-6)
    a = load_file(str(latest_checkpoint(tmp_path / "full") / "trainable.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "part") / "trainable.safetensors"))
    router_keys = [k for k in a if k.startswith("router.")]
    assert router_keys  # the router's state is in the checkpoint
    for k in router_keys:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def _batch_and_trainee(caches, tiny_student, teachers, **kw):
    from kvkd.train.loader import DistillDataset, collate
    from kvkd.train.trainer import build_trainee, load_training_examples, open_teachers

    cfg = _cfg(caches, "unused", tiny_student, teachers=teachers, **kw)
    _, metas = open_teachers(cfg)
    torch.manual_seed(0)
    trainee = build_trainee(cfg, metas)
    examples = load_training_examples(cfg, metas[0])
    ds = DistillDataset(examples, trainee.student.tokenizer, cfg.caches)
    batch = collate([ds[i] for i in range(4)], pad_id=trainee.student.tokenizer.pad_token_id)
    return cfg, trainee, batch


def test_importance_weighted_kv_loss_and_cka_in_the_step(caches, tiny_student):
    from kvkd.train.losses import cka_loss, kv_loss
    from kvkd.train.trainer import distill_step

    cfg, trainee, batch = _batch_and_trainee(caches, tiny_student, ("nl", "eq"), kv_weighting="importance", a3=0.5)
    trainee.eval()
    with torch.no_grad():
        loss, logs = distill_step(trainee, batch, cfg, 0)
        out = trainee.student(batch["q_ids"], batch["q_mask"], batch["s_ids"], batch["s_mask"], batch["answer_start"])
    for k, t in enumerate(batch["teachers"]):
        manual = kv_loss(out.keys, out.values, t["keys"], t["values"], t["slot_valid"], cfg.kv_loss, cfg.std_norm, slot_weights=t["slot_importance"])
        plain = kv_loss(out.keys, out.values, t["keys"], t["values"], t["slot_valid"], cfg.kv_loss, cfg.std_norm)
        assert abs(logs["kv"][k] - float(manual.mean())) < 1e-5
        assert abs(logs["kv"][k] - float(plain.mean())) > 1e-6  # the importances do change the loss
        assert abs(logs["cka"][k] - float(cka_loss(out.hidden, t["hidden"]))) < 1e-5
    w = torch.tensor(logs["weights"])  # fixed router: 1/2 each
    distill = sum(w[k] * (cfg.a1 * logs["codi"][k] + cfg.a2 * logs["kv"][k] + cfg.a3 * logs["cka"][k]) for k in range(2))
    assert abs(logs["loss"] - (logs["ce"] + float(distill))) < 1e-4


def test_target_fusion_equals_loss_fusion_for_identical_teachers(caches, tiny_student):
    from kvkd.train.trainer import distill_step

    results = {}
    for fusion in ("loss", "target"):
        cfg, trainee, batch = _batch_and_trainee(caches, tiny_student, ("nl", "nl"), fusion=fusion, a3=0.3)
        trainee.eval()
        with torch.no_grad():
            results[fusion] = distill_step(trainee, batch, cfg, 0)[1]
    assert abs(results["loss"]["loss"] - results["target"]["loss"]) < 1e-4
    assert results["target"]["fused"] is not None and results["loss"]["fused"] is None


def test_fuse_hand_computed():
    from kvkd.train.trainer import _fuse

    a, b = torch.tensor([[[[[1.0], [2.0]]]]]), torch.tensor([[[[[3.0], [5.0]]]]])  # (B=1, L=1, H=1, M=2, D=1)
    w = torch.tensor([[0.25, 0.75]])
    fused, _ = _fuse([a, b], w)
    assert torch.allclose(fused, torch.tensor([[[[[2.5], [4.25]]]]]))
    valid = [torch.tensor([[[[True, False]]]]), torch.tensor([[[[True, True]]]])]  # slot 2 of teacher a is empty
    fused, ok = _fuse([a, b], w, valid)
    assert torch.allclose(fused, torch.tensor([[[[[2.5], [5.0]]]]]))  # renormalised over the valid teacher
    assert ok.all()


@pytest.mark.slow
def test_corrupted_teacher_gets_less_weight(caches, tmp_path, tiny_student):
    mean_w = {}
    for router in ("fixed", "govern", "ca-mkd", "ae-kd"):
        run = tmp_path / router
        train(_cfg(caches, run, tiny_student, teachers=("nl", "eq", "flip"), router=router, steps=6, lr=1e-3))
        mean_w[router] = np.mean([e["weights"] for e in _log(run)], 0)
    assert np.allclose(mean_w["fixed"], 1 / 3)
    for router in ("govern", "ca-mkd"):
        assert mean_w[router][2] < 0.5 * min(mean_w[router][:2]), (router, mean_w[router])
    # AE-KD, faithfully: its min-norm point *balances* a conflicting teacher instead of dropping
    # it (a sign-flipped teacher cancels the one it mirrors), so it does not down-weight it.
    assert mean_w["ae-kd"][2] > 0.3, mean_w["ae-kd"]


def test_per_sample_activation_gradients_hand_computed():
    from kvkd.train.trainer import _parameter_grads, _per_sample_grads

    o1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)  # (B=2, 2)
    o2 = torch.tensor([[[0.5]], [[-1.0]]], requires_grad=True)  # (B=2, 1, 1)
    t = torch.tensor([[0.0, 1.0], [2.0, 2.0]])  # per-teacher targets for o1
    # teacher k's per-sample loss: sum((o1 - t_k)^2) + k * o2
    losses = torch.stack([((o1 - t[k]) ** 2).sum(1) + k * o2.reshape(2) for k in range(2)], 1)  # (B, K)
    g = _per_sample_grads(losses, [o1, o2])  # (B, K, 3)
    expected = torch.tensor([
        [[2.0, 2.0, 0.0], [-2.0, 0.0, 1.0]],
        [[6.0, 6.0, 0.0], [2.0, 4.0, 1.0]],
    ])
    assert torch.allclose(g, expected)
    # parameter space: gradient of each teacher's batch-mean loss
    w = torch.tensor([1.0, -1.0], requires_grad=True)
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    losses = torch.stack([(x @ w) ** 2, 2 * (x @ w)], 1)  # (B, K)
    gp = _parameter_grads(losses, [w])  # (1, K, 2)
    # d/dw mean_b (x_b.w)^2 = mean_b 2 (x_b.w) x_b = ((-1)*2*[1,2] + 3*2*[3,0]) / 2 = [8, -2]
    assert torch.allclose(gp, torch.tensor([[[8.0, -2.0], [4.0, 2.0]]]))
