"""Loss terms as plug-ins: the contract every registered term keeps, the options and log
columns that follow from the registry, and SIM-CoT's step-level supervision (hand-computed
values, an independent reimplementation on a tiny model, the step alignment, a training run)."""

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch

from kvkd.data import Example
from kvkd.pipeline.extract import ExtractConfig, extract
from kvkd.train.losses import LOSSES, AlignedTeacher, TermInputs, simcot_loss, terms
from kvkd.train.losses.simcot import teacher_steps, tokenize_steps
from kvkd.train.trainer import TrainConfig, build_student, train

B, M = 3, 3


@pytest.fixture(scope="module")
def student(tiny_student):
    torch.manual_seed(0)
    cfg = TrainConfig(student=str(tiny_student), lora_r=4)
    return build_student(str(tiny_student), M, cfg)


def _batch(student, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = student.base.get_input_embeddings().weight.shape[0] - 2  # not <bot>/<eot>
    q_ids = torch.randint(10, V, (B, 6), generator=g)
    s_ids = torch.randint(10, V, (B, 5), generator=g)
    ones = torch.ones_like
    steps = torch.randint(10, V, (B, M, 4), generator=g).int()
    step_mask = torch.ones(B, M, 4, dtype=torch.bool)
    step_mask[0, 2] = False  # sample 0: latent 3 has no step
    step_mask[1, :, 2:] = False  # sample 1: two-token steps
    return dict(q_ids=q_ids, q_mask=ones(q_ids), s_ids=s_ids, s_mask=ones(s_ids), answer_start=torch.full((B,), 2)), steps, step_mask


def _teacher_like(out, steps, step_mask, noise=0.0, seed=1):
    g = torch.Generator().manual_seed(seed)

    def n(x):
        return x.detach() + noise * torch.randn(x.shape, generator=g)

    return AlignedTeacher(hidden=n(out.hidden), keys=n(out.keys), values=n(out.values), valid=torch.ones(out.keys.shape[:-1], dtype=torch.bool),
                          slot_weights=torch.rand(out.keys.shape[:-1], generator=g) + 0.5, features=out.features,
                          answer_nll=torch.ones(out.keys.shape[0]), data={"step_ids": steps, "step_mask": step_mask})


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_term_keeps_the_contract(student, name):
    cls = LOSSES.get(name)
    assert cls.name == name and cls.weight in {f.name for f in dataclasses.fields(cls.Options)}
    cfg = TrainConfig(kv_weighting="importance", **{cls.weight: 1.0})
    batch, steps, step_mask = _batch(student)
    student.zero_grad()
    out = student(**batch)
    term = cls()
    inputs = TermInputs(out, student, cfg)
    same, other = _teacher_like(out, steps, step_mask), _teacher_like(out, steps, step_mask, noise=0.5)
    v_same, v_other = term(inputs, same), term(inputs, other)
    assert v_same.shape == ((B,) if cls.per_sample else ()) and v_same.dtype == torch.float32
    assert torch.isfinite(v_same).all() and torch.isfinite(v_other).all() and (v_other >= 0).all()
    if cls.fuses_targets:  # a distance to a tensor target: 0 when the teacher is the student
        assert torch.allclose(v_same, torch.zeros(()), atol=1e-5), v_same
        assert (v_other > v_same + 1e-4).all()
    v_other.sum().backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)  # the term trains the student
    cls.check(cfg)
    with pytest.raises(ValueError, match=f"--{cls.weight}"):
        cls.check(dataclasses.replace(cfg, **{cls.weight: -1.0}))


def test_options_and_log_columns_follow_the_registry():
    from kvkd.config import cli_options
    from kvkd.train.options import LossArgs
    from kvkd.train.trainer import StepLog

    flags = {s.flags[0] for s in cli_options(TrainConfig) if s.group == "losses"}
    for cls in terms():
        assert {f.name for f in dataclasses.fields(cls.Options)} <= set(TrainConfig.__dataclass_fields__)
        assert f"--{cls.weight}" in flags and cls.name in StepLog.__dataclass_fields__
    assert {"--a1", "--a2", "--a3", "--a4", "--fusion", "--kv-weighting"} <= flags
    assert [f.name for f in dataclasses.fields(LossArgs)][:4] == ["a1", "a2", "a3", "a4"]
    assert TrainConfig().a4 == 0.0 and TrainConfig().a1 == 10.0


def test_a_new_term_is_one_registration():
    from kvkd.config import opt
    from kvkd.train import options, trainer
    from kvkd.train.losses import LossTerm, register_loss

    @register_loss
    class Probe(LossTerm):
        name = "probe"
        weight = "a_probe"

        @dataclasses.dataclass
        class Options:
            a_probe: float = opt(0.0, help="Weight of a probe")

    try:
        assert "a_probe" in {f.name for f in dataclasses.fields(options._loss_args())}
        assert "probe" in trainer._step_log_class().__dataclass_fields__
    finally:
        LOSSES._items.pop("probe")
    with pytest.raises(ValueError, match="twice"):
        LOSSES.register("kv")(Probe)
    Probe.name = "not-an-identifier"
    with pytest.raises(ValueError, match="identifier"):
        register_loss(Probe)


# ---------------------------------------------------------------------------- SIM-CoT


class _Identity(torch.nn.Module):
    def forward(self, inputs_embeds, attention_mask=None, use_cache=False):
        return SimpleNamespace(last_hidden_state=inputs_embeds)


def test_simcot_loss_hand_computed():
    """Decoder = identity, head = identity, embeddings = one-hot: logits at position j are the
    decoder input there, so every NLL is a hand-computable log-softmax."""
    emb = torch.nn.Embedding(2, 2)
    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        emb.weight.copy_(torch.eye(2))
        head.weight.copy_(torch.eye(2))
    base = SimpleNamespace(dtype=torch.float32, lm_head=head)
    stub = SimpleNamespace(base=base, decoder=_Identity(), embed=emb)
    z = torch.tensor([[[0.0, math.log(3)], [5.0, 5.0]]], requires_grad=True)  # (B=1, M=2, d=2)
    ids = torch.tensor([[[1, 0], [0, 0]]])
    mask = torch.tensor([[[True, True], [False, False]]])  # latent 2 has no step
    loss = simcot_loss(stub, z, ids, mask)
    # position 0 (input z_1 = [0, ln 3]) predicts token 1: p = 3/4; position 1 (input e(1) =
    # [0, 1]) predicts token 0: p = 1/(1+e). Mean over the 2 step tokens.
    expected = (math.log(4 / 3) + math.log(1 + math.e)) / 2
    assert loss.shape == (1,) and abs(float(loss.detach()) - expected) < 1e-6
    loss.sum().backward()
    assert float(z.grad[0, 0].abs().sum()) > 0 and float(z.grad[0, 1].abs().sum()) == 0  # unsupervised latent: no gradient
    empty = simcot_loss(stub, z, ids, torch.zeros_like(mask))
    assert torch.equal(empty, torch.zeros(1))


def test_simcot_loss_matches_an_independent_reimplementation(student):
    batch, steps, step_mask = _batch(student, seed=3)
    with torch.no_grad():
        out = student(**batch)
        got = simcot_loss(student, out.latents, steps, step_mask)
        lm = student.base
        for b in range(B):
            nll, count = 0.0, 0
            for k in range(M):
                n = int(step_mask[b, k].sum())
                if n == 0:
                    continue
                tok = steps[b, k, :n].long()
                x = torch.cat([out.latents[b, k][None], lm.get_input_embeddings()(tok)], 0)[None]  # (1, 1+n, d), unpadded
                logp = torch.log_softmax(lm(inputs_embeds=x).logits[0, :n].float(), -1)
                nll -= float(logp[torch.arange(n), tok].sum())
                count += n
            assert abs(float(got[b]) - nll / count) < 1e-4, (b, float(got[b]), nll / count)


def test_simcot_steps_come_from_each_teachers_trace_and_align_to_latents():
    ex = Example(id="r1", question="q", cot="Half: 48/2 = 24\n\nSum: 48+24 = 72\nSo 72", answer="72", equations=("48/2=24", "48+24=72"))
    nl = {"trace": "nl", "drop_last_step": False, "trace_fallback": None, "trace_fallback_ids": []}
    assert teacher_steps(ex, nl) == ["Half: 48/2 = 24", "Sum: 48+24 = 72", "So 72"]
    assert teacher_steps(ex, {**nl, "drop_last_step": True}) == ["Half: 48/2 = 24", "Sum: 48+24 = 72"]
    eq = {"trace": "equations", "drop_last_step": False, "trace_fallback": "nl", "trace_fallback_ids": ["other"]}
    assert teacher_steps(ex, eq) == ["<<48/2=24>>", "<<48+24=72>>"]
    assert teacher_steps(ex, {**eq, "trace_fallback_ids": ["r1"]})[0] == "Half: 48/2 = 24"  # this row read the fallback trace
    with pytest.raises(ValueError, match="re-extract"):
        teacher_steps(ex, {"rows": 1})

    class CharTokenizer:  # one id per character: ord(c)
        eos_token_id = 1

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[ord(c) for c in t] for t in texts]}

    got = tokenize_steps(CharTokenizer(), [["ab", "cde", "f"], ["g"]], num_latents=2, max_tokens=2)
    # row 0: steps 1, 2 -> latents 1, 2 (step 3 dropped), "cde" truncated to 2 tokens, each + <eos>
    assert got["step_ids"].tolist() == [[[97, 98, 1], [99, 100, 1]], [[103, 1, 0], [0, 0, 0]]]
    assert got["step_mask"].tolist() == [[[True] * 3, [True] * 3], [[True, True, False], [False] * 3]]


@pytest.fixture(scope="module")
def caches(tmp_path_factory, shared_data, tiny_teacher):
    root = tmp_path_factory.mktemp("simcot_caches")
    data = root / "train.jsonl"
    data.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:8]) + "\n")
    out = []
    for trace in ("nl", "equations"):
        extract(ExtractConfig(model=str(tiny_teacher), data=str(data), out=str(root / f"{trace}.zarr"), slots=3, batch_size=8, trace=trace, trace_fallback="nl"))
        out.append(str(root / f"{trace}.zarr"))
    return out


def _cfg(caches, out, tiny_student, **kw):
    base = dict(caches=caches, out=str(out), student=str(tiny_student), steps=2, batch_size=4, lora_r=4, num_workers=0, save_every=0,
                warmup_steps=1, router="fixed")
    base.update(kw)
    return TrainConfig(**base)


def test_simcot_in_the_step_is_per_teacher_and_router_weighted(caches, tiny_student):
    from kvkd.train.loader import DistillDataset, collate
    from kvkd.train.losses.base import teacher_extras
    from kvkd.train.trainer import build_trainee, distill_step, load_training_examples, open_teachers

    for fusion in ("loss", "target"):
        cfg = _cfg(caches, "unused", tiny_student, a4=0.7, router_weights=[0.25, 0.75], fusion=fusion)
        _, metas = open_teachers(cfg)
        torch.manual_seed(0)
        trainee = build_trainee(cfg, metas)
        tok = trainee.student.tokenizer
        examples = load_training_examples(cfg, metas[0])
        assert teacher_extras(dataclasses.replace(cfg, a4=0.0), examples, metas, tok, M) is None  # off: nothing built
        extras = teacher_extras(cfg, examples, metas, tok, M)
        assert not torch.equal(extras[0]["step_mask"], extras[1]["step_mask"])  # each teacher's own steps (nl vs equations)
        ds = DistillDataset(examples, tok, cfg.caches, teacher_extras=extras)
        batch = collate([ds[i] for i in range(4)], pad_id=tok.pad_token_id)
        trainee.eval()
        with torch.no_grad():
            loss, logs = distill_step(trainee, batch, cfg, 0)
            out = trainee.student(batch["q_ids"], batch["q_mask"], batch["s_ids"], batch["s_mask"], batch["answer_start"])
            per = [simcot_loss(trainee.student, out.latents, t["step_ids"], t["step_mask"]) for t in batch["teachers"]]
        assert logs["terms"] == [c.name for c in terms()] and "simcot" in logs["terms"]
        for k in range(2):
            assert abs(logs["simcot"][k] - float(per[k].mean())) < 1e-5 and logs["simcot"][k] > 0
        simcot_part = float(sum(w * cfg.a4 * p.mean() for w, p in zip((0.25, 0.75), per)))
        if fusion == "loss":
            distill = sum(w * (cfg.a1 * logs["codi"][k] + cfg.a2 * logs["kv"][k]) for k, w in enumerate((0.25, 0.75)))
            assert abs(logs["loss"] - (logs["ce"] + distill + simcot_part)) < 1e-4
        else:  # SIM-CoT's token targets do not fuse: its weighted per-teacher losses join the fused terms
            assert abs(logs["loss"] - (logs["ce"] + logs["fused"] + simcot_part)) < 1e-4


def test_training_with_simcot_logs_it_and_plots(caches, tmp_path, tiny_student):
    from kvkd.eval.report import loss_terms, plot_run

    train(_cfg(caches, tmp_path / "run", tiny_student, a4=1.0))
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert loss_terms(log) == ["codi", "kv", "cka", "simcot"]
    for e in log:
        assert len(e["simcot"]) == 2 and all(math.isfinite(v) and v > 0 for v in e["simcot"]) and e["cka"] == [0.0, 0.0]
    assert plot_run(tmp_path / "run", tmp_path / "run.png").stat().st_size > 0
    # a log written before terms were listed (old run folders) still plots
    old = tmp_path / "old"
    old.mkdir()
    (old / "log.jsonl").write_text("".join(json.dumps({k: v for k, v in e.items() if k not in ("terms", "simcot")}) + "\n" for e in log))
    assert loss_terms([json.loads(x) for x in (old / "log.jsonl").read_text().splitlines()]) == ["codi", "kv", "cka"]
    assert plot_run(old, tmp_path / "old.png").stat().st_size > 0


def test_bad_simcot_options_are_refused_before_loading(caches, tmp_path, tiny_student):
    with pytest.raises(ValueError, match="--a4 must be >= 0"):
        train(_cfg(caches, tmp_path / "a", tiny_student, a4=-1.0))
    with pytest.raises(ValueError, match="--simcot-step-tokens"):
        train(_cfg(caches, tmp_path / "b", tiny_student, a4=1.0, simcot_step_tokens=0))
