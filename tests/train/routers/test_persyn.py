"""persyn (PerSyn-style learnability x quality): hand-computed rewards and weights, the
student's trace likelihood against a direct computation, traces rebuilt from a cache's data."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from kvkd.train.routers import RouterInputs, build_router
from kvkd.train.routers.learnability import teacher_traces, trace_stats

# learnability L (nats/token) and cached NLL over N = 2 rows, K = 2 teachers
L = torch.tensor([[-3.0, -1.0], [-2.0, -2.0]])  # values' mean -2, std sqrt(2/3)
NLL = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # quality -NLL: mean -2, std sqrt(4/3)
ZL0 = 1 / math.sqrt(2 / 3)  # |z| of row 0's learnabilities
ZQ = 1 / math.sqrt(4 / 3)  # |z| of every quality


def _router(**opts):
    router = build_router("persyn", 2, 2, opts)
    router.prepare(NLL)
    router.set_learnability(L)
    return router


def _inp(rows):
    rows = torch.tensor(rows)
    return RouterInputs(torch.zeros(len(rows), 2), torch.zeros(len(rows), 2, 2), torch.zeros(len(rows), 2), NLL[rows], rows=rows)


def test_rewards_hand_computed():
    r = _router(learnability_weight=0.5).scores(_inp([0, 1]))
    expected = torch.tensor([[0.5 * (-ZL0 + ZQ), 0.5 * (ZL0 - ZQ)], [0.5 * -ZQ, 0.5 * ZQ]])
    assert torch.allclose(r, expected, atol=1e-6)


def test_hard_routing_follows_the_mix():
    # row 0: teacher 1's trace is more learnable, teacher 0's answer NLL is better
    assert torch.equal(_router(learnability_weight=0.5)(_inp([0, 1])), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert torch.equal(_router(learnability_weight=0.25)(_inp([0])), torch.tensor([[1.0, 0.0]]))
    assert torch.equal(_router(learnability_weight=0.0)(_inp([0])), torch.tensor([[1.0, 0.0]]))  # quality only = min-ce here
    assert torch.equal(_router(learnability_weight=1.0)(_inp([1])), torch.tensor([[0.5, 0.5]]))  # equal L: tie split


def test_soft_routing_hand_computed():
    w = _router(learnability_weight=0.5, temperature=1.0)(_inp([0]))
    d = ZL0 - ZQ  # r1 - r0
    assert torch.allclose(w, torch.tensor([[1 / (1 + math.exp(d)), 1 / (1 + math.exp(-d))]]), atol=1e-6)


def test_refusals():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_router("persyn", 2, 2, {"learnability_weight": 1.5})
    with pytest.raises(ValueError, match="no learnability yet"):
        build_router("persyn", 2, 2)(_inp([0]))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        build_router("persyn", 2, 2).set_learnability(torch.zeros(4, 3))


def test_trace_loglik_equals_a_direct_computation(tiny_student):
    from kvkd.train.options import TrainConfig
    from kvkd.train.trainer import build_student

    student = build_student(str(tiny_student), 2, TrainConfig(lora_r=4))
    qs, traces = ["What is 2+3?", "Tom has 4 apples and eats one. How many are left?"], ["2+3=5", "4-1=3 so three are left"]
    stats = trace_stats(student, qs + [qs[0]], traces + [""], batch_size=2, max_rank=50)  # padding, and an empty trace
    got = stats["loglik"]
    tok = student.tokenizer
    for i in range(2):
        head = tok(qs[i] + "\n", add_special_tokens=True)["input_ids"]
        full = tok(qs[i] + "\n" + traces[i], add_special_tokens=True)["input_ids"]
        assert full[: len(head)] == head  # the trace's tokens start where the head's end
        with torch.no_grad():
            logp = torch.log_softmax(student.base(input_ids=torch.tensor([full])).logits[0].float(), -1)
        want = torch.stack([logp[t - 1, full[t]] for t in range(len(head), len(full))]).mean()
        assert float(got[i]) == pytest.approx(float(want), abs=1e-4)
        ranks = torch.tensor([min(50, int((logp[t - 1] > logp[t - 1, full[t]]).sum()) + 1) for t in range(len(head), len(full))]).float()
        assert float(stats["rank"][i]) == pytest.approx(float(ranks.mean()), abs=1e-4)
        assert float(stats["rsr"][i]) == pytest.approx(float(ranks.mean() / -want), rel=1e-4)
    assert float(got[2]) == 0.0 and float(stats["rsr"][2]) == 0.0


def test_teacher_traces_read_back_from_the_recorded_data(tmp_path):
    rows = [{"id": "a", "question": "Q1", "cot": "step a1\nstep a2", "answer": "1"}, {"id": "b", "question": "Q2", "cot": "b1", "answer": "2"}]
    planted = [dict(rows[0], cot=rows[1]["cot"]), dict(rows[1], cot=rows[0]["cot"])]  # each row reads the other's trace
    path = tmp_path / "planted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in planted))
    examples = [SimpleNamespace(id=r["id"], question=r["question"]) for r in rows]
    meta = {"dataset": {"source": str(path), "format": "jsonl", "rows": 2, "offset": 0, "trace": "nl", "drop_last_step": False}}
    assert teacher_traces(examples, meta) == ["b1", "step a1\nstep a2"]
    assert teacher_traces(examples, {"dataset": dict(meta["dataset"], drop_last_step=True)}) == ["b1", "step a1"]
    with pytest.raises(ValueError, match="no row 'c'"):
        teacher_traces([SimpleNamespace(id="c", question="Q3")], meta)
    with pytest.raises(ValueError, match="cannot read the traces"):
        teacher_traces(examples, {"dataset": dict(meta["dataset"], source=str(tmp_path / "gone.jsonl"))})
