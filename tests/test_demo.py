"""``kvkd demo`` end to end on a tiny random model: the teacher writes its own traces, both
caches (gold CoT, own traces) hold the same rows, training and evaluation run, and the
per-teacher differences are reported."""

import json

import pytest

from kvkd.cache.reader import CacheReader
from kvkd.demo import DemoConfig, run_demo
from kvkd.traces import read_trace_file


@pytest.mark.slow  # ~1-2 min on 2 busy cores
def test_demo_with_a_generated_teacher(tiny_teacher, tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "demo"), model=str(tiny_teacher), train_rows=4, test_rows=2, steps=2, batch_size=2, slots=3,
                     gen_max_new_tokens=6, extract_batch_size=4)
    res = run_demo(cfg)
    tf = read_trace_file(tmp_path / "demo" / "traces" / "smollm2-greedy.jsonl")
    assert tf.complete and len(tf.lines) == 4 and res.generate["traces"] == 4
    gold, own = (CacheReader.open(t["cache"]).metadata["dataset"] for t in res.teachers)
    assert gold["fingerprint"] == own["fingerprint"] and own["format"] == "trace"
    assert own["trace_file"]["sha256"] == tf.identity()["sha256"]
    solved = sum(ln["correct"] for ln in tf.lines)
    assert [t["rows_with_own_trace"] for t in res.teachers] == [0, solved]
    assert solved == 0  # the random tiny teacher (greedy, seeded) solves nothing: both read the gold CoT, the same NLL
    assert abs(res.teachers[0]["mean_answer_nll"] - res.teachers[1]["mean_answer_nll"]) < 1e-5
    assert abs(sum(t["mean_router_weight"] for t in res.teachers) - 1) < 1e-5
    saved = json.loads((tmp_path / "demo" / "report" / "demo.json").read_text())
    assert saved["teachers"] == res.teachers and len(res.evals) == 3
