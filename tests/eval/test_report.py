"""Tests for kvkd.eval.report: the Markdown results table, the run log reader and the run plot."""

from __future__ import annotations

import json

import pytest

from kvkd.eval.evaluate import EvalResult
from kvkd.eval.report import plot_run, read_log, results_table


def _result(name, correct, n, nll):
    from kvkd.eval.answers import wilson_interval

    lo, hi = wilson_interval(correct, n)
    return EvalResult(name=name, mode="latent", data="d.jsonl", n=n, correct=correct, accuracy=correct / n, ci_low=lo, ci_high=hi,
                      mean_answer_nll=nll, wall_s=12.34, predictions="p.jsonl")


def test_results_table_rows():
    table = results_table([_result("run-a", 8, 10, 1.23456), _result("plain (nocot)", 0, 10, 4.0)])
    lines = table.splitlines()
    assert lines[0] == "| method | n | accuracy | 95% CI | answer NLL (nats/token) | wall (s) |"
    assert lines[2] == "| run-a | 10 | 80.0% (8/10) | [49.0, 94.3] | 1.235 | 12.3 |"  # Wilson 8/10: 0.490, 0.943
    assert lines[3] == "| plain (nocot) | 10 | 0.0% (0/10) | [0.0, 27.8] | 4.000 | 12.3 |"
    assert len(lines) == 4 and results_table([]).count("\n") == 1


def _step(step, k=2, cka=None):
    return {"step": step, "loss": 2.0 / step, "ce": 1.0 / step, "codi": [0.5] * k, "kv": [0.25] * k, "cka": cka, "weights": [1 / k] * k}


def test_read_log_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="kvkd train run folder"):
        read_log(tmp_path)
    (tmp_path / "log.jsonl").write_text(json.dumps(_step(1)) + "\n\n" + json.dumps(_step(2)) + "\n")
    assert [e["step"] for e in read_log(tmp_path)] == [1, 2]  # blank lines skipped


def test_plot_run_writes_a_png(tmp_path):
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(_step(s, k=3, cka=[0.1, 0.2, 0.3])) + "\n" for s in (1, 2, 3)))
    out = plot_run(tmp_path, tmp_path / "plots" / "training.png")
    assert out == tmp_path / "plots" / "training.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "log.jsonl").write_text("")
    with pytest.raises(ValueError, match="no steps yet"):
        plot_run(empty, empty / "x.png")
    assert not (empty / "x.png").exists()
