"""Tests for kvkd.eval.evaluate: scoring of hand-made rows end to end (generation replaced by
fixed outputs), the checks made before generation, the per-eval folder and its metrics.json,
contamination warnings, and validation on a tiny random student."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kvkd.eval.evaluate as ev
from kvkd.data import DataError, dataset_fingerprint, load_examples
from kvkd.eval.evaluate import EvalConfig, choose_answer_check, evaluate
from kvkd.eval.validation import validate

ROWS = [  # (id, question, gold, model output)
    ("r1", "Mix 3 cups of flour with 4 of sugar: ratio?", "3:4", "The answer is: 3"),
    ("r2", "Lunch ends at?", "3:30 p.m.", "The answer is: 3:30 pm"),
    ("r3", "Which place?", "6th", "The answer is: 6"),
    ("r4", "How much of the pie is left?", "3/4", "The answer is: 3"),
    ("r5", "How many cups?", "1 1/2", "The answer is: 3/2"),
    ("r6", "18 + 47?", "65", "The answer is: 18 + 47 = 65"),
    ("r7", "How many apples?", "12", "The answer is: twelve"),
]


def _write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"id": i, "question": q, "cot": "", "answer": a}) + "\n" for i, q, a, _ in rows))
    return path


@pytest.fixture
def fixed_outputs(monkeypatch):
    """Replace the student's decoding by the rows' outputs (NLL = 1 + row index / 10)."""
    calls = []

    def fake(student, examples, batch_size, max_new_tokens, on_progress=None):
        calls.append(len(examples))
        by_id = {i: out for i, _, _, out in ROWS}
        return [by_id[ex.id] for ex in examples], [1.0 + k / 10 for k in range(len(examples))]

    monkeypatch.setattr(ev, "_latent_predictions", fake)
    return calls


def test_hand_made_rows_scored_and_written(tmp_path, monkeypatch, fixed_outputs):
    (tmp_path / "hand").mkdir()
    data = _write_rows(tmp_path / "hand" / "test.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    res = evaluate(EvalConfig(data=str(data), untrained=True, model="unused"), student=object())
    # correct: r2 (time), r3 (ordinal), r5 (3/2 == 1 1/2), r6 (the equation's result); wrong: r1, r4 (first numbers), r7
    assert (res.n, res.correct, res.no_answer) == (7, 4, 1)
    assert res.accuracy == pytest.approx(4 / 7) and res.answer_check == "numeric"
    assert res.gold_kinds == {"number": 2, "fraction": 1, "mixed": 1, "ordinal": 1, "ratio": 1, "time": 1}
    assert res.mean_answer_nll == pytest.approx(sum(1 + k / 10 for k in range(7)) / 7)
    folder = Path(res.folder)
    assert folder == tmp_path / "evals" / "hand-test-untrained"
    preds = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
    assert [p["correct"] for p in preds] == [False, True, True, False, True, True, False]
    assert [p["prediction"] for p in preds] == ["3", "3:30 pm", "6", "3", "3/2", "65", None]
    assert preds[-1]["status"] == "no_answer"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["n"] == 7 and metrics["correct"] == 4 and metrics["ci_low"] < 4 / 7 < metrics["ci_high"]
    assert metrics["fingerprint"] == dataset_fingerprint(load_examples(str(data)).examples)
    assert metrics["versions"]["kvkd"] and metrics["versions"]["torch"] and metrics["mode"] == "latent"
    assert not list(folder.glob("*.tmp"))
    # a rerun never overwrites the first: a new folder; a window of rows is named
    again = evaluate(EvalConfig(data=str(data), untrained=True, model="unused"), student=object())
    assert Path(again.folder).name == "hand-test-untrained-2" and (folder / "metrics.json").read_text() == (tmp_path / "evals" / "hand-test-untrained" / "metrics.json").read_text()
    window = evaluate(EvalConfig(data=str(data), untrained=True, model="unused", offset=2, limit=3), student=object())
    assert Path(window.folder).name == "hand-test-rows2-5-untrained" and window.n == 3


def test_numeric_check_refuses_before_generation(tmp_path, fixed_outputs):
    rows = ROWS[:2] + [("m1", "Simplify.", "\\sqrt{117}", ""), ("m2", "Who?", "\\text{Evelyn}", "")]
    data = _write_rows(tmp_path / "mixed.jsonl", rows)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"2 of 4 gold answers .*m1 .*m2 .*--answer-check math"):
        evaluate(EvalConfig(data=str(data), untrained=True, model="unused", answer_check="numeric", out=str(out)), student=object())
    assert fixed_outputs == [] and not out.exists()  # nothing generated, nothing written
    # auto: the numeric check cannot represent them, so math-verify scores the set
    assert choose_answer_check("auto", load_examples(str(data))) == "math"
    assert choose_answer_check("auto", load_examples(str(_write_rows(tmp_path / "n.jsonl", ROWS)))) == "numeric"


def test_auto_check_of_a_math_set(shared_data):
    math500 = load_examples(str(shared_data / "math500"), limit=5)  # a folder with one split needs no split
    assert choose_answer_check("auto", math500) == "math"  # "p - q" and \text{Evelyn} are no numbers
    numeric_golds = load_examples(str(shared_data / "math500"), offset=5, limit=2)  # "42", "27"
    assert [ex.answer for ex in numeric_golds.examples] == ["42", "27"]
    assert choose_answer_check("auto", numeric_golds) == "math"  # \boxed{} solutions: a MATH set
    upstream = load_examples(str(shared_data / "math500" / "orig"), limit=2)
    assert upstream.fmt == "math" and choose_answer_check("auto", upstream) == "math"


def test_finished_out_folder_is_refused(tmp_path, fixed_outputs):
    data = _write_rows(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "mine"
    evaluate(EvalConfig(data=str(data), untrained=True, model="unused", out=str(out)), student=object())
    with pytest.raises(FileExistsError, match="already holds a finished evaluation"):
        evaluate(EvalConfig(data=str(data), untrained=True, model="unused", out=str(out)), student=object())
    with pytest.raises(ValueError, match="--out .*preds.jsonl: give a folder"):
        evaluate(EvalConfig(data=str(data), untrained=True, model="unused", out=str(tmp_path / "preds.jsonl")), student=object())
    assert fixed_outputs == [7]


def test_unwritable_folder_fails_before_generation(tmp_path, fixed_outputs):
    data = _write_rows(tmp_path / "rows.jsonl", ROWS)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(PermissionError, match="cannot write the eval folder .*--out FOLDER"):
        evaluate(EvalConfig(data=str(data), untrained=True, model="unused", out=str(tmp_path / "a_file" / "eval")), student=object())
    assert fixed_outputs == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_fails_before_generation(tmp_path, fixed_outputs):
    data = _write_rows(tmp_path / "rows.jsonl", ROWS)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="--out"):
            evaluate(EvalConfig(data=str(data), untrained=True, model="unused", out=str(locked / "eval")), student=object())
    finally:
        locked.chmod(0o700)
    assert fixed_outputs == []


def test_contamination_warned(tmp_path, monkeypatch, fixed_outputs):
    import kvkd.eval.overlap as overlap

    data = _write_rows(tmp_path / "rows.jsonl", ROWS)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"caches": ["teacher.zarr"]}))
    train_rows = load_examples(str(_write_rows(tmp_path / "train.jsonl", [
        ("t1", "  how MUCH of the pie is\tleft? ", "1", ""),  # r4's question, other id, other spacing/case
        ("r6", "another question", "2", ""),  # r6's id
        ("t3", "unrelated", "3", ""),
    ]))).examples
    monkeypatch.setattr(overlap, "cache_training_examples", lambda cache: train_rows)
    seen = []
    res = evaluate(EvalConfig(data=str(data), run=str(run)), student=object(), on_warning=seen.append)
    assert seen == res.warnings and len(seen) == 1
    assert "2 of 7 eval questions" in seen[0] and "1 by question text, 1 by id" in seen[0] and "r4, r6" in seen[0]
    assert json.loads(Path(res.metrics).read_text())["warnings"] == seen
    assert Path(res.folder).parent == run / "evals"


def test_cli_errors_are_one_line(tmp_path):
    from kvkd.cli import app

    data = _write_rows(tmp_path / "rows.jsonl", [("m1", "Who?", "\\text{Evelyn}", "")])
    r = CliRunner().invoke(app, ["eval", "--model", "x", "--untrained", "--data", str(data), "--answer-check", "numeric"])
    assert r.exit_code == 2 and "--answer-check math" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["eval", "--run", str(tmp_path / "nope"), "--data", str(data)])
    assert r.exit_code == 2 and "not a kvkd train run folder" in r.output
    assert not (tmp_path / "nope").exists()  # no eval folder left behind in a missing run
    r = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "no-model"), "--mode", "nocot", "--data", str(data),
                                 "--answer-check", "math", "--out", str(tmp_path / "failed")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert not (tmp_path / "failed").exists()  # the model failed to load: no empty eval folder left
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("kvkd ") and "torch " in r.output and "transformers " in r.output


def test_validate_matches_evaluate_on_a_tiny_student(tiny_student, tmp_path):
    import torch

    from kvkd.train.trainer import TrainConfig, build_student

    data = _write_rows(tmp_path / "valid.jsonl", ROWS[2:6])
    rows = load_examples(str(data)).examples
    torch.manual_seed(0)
    student = build_student(str(tiny_student), 2, TrainConfig(use_lora=False))
    student.train()
    got = validate(student, rows, batch_size=3)
    assert got.n == 4 and got.accuracy is None and 0 < got.mean_answer_nll < 30
    assert student.training  # its mode is given back
    with_acc = validate(student, rows, batch_size=2, accuracy=True, max_new_tokens=2)
    assert with_acc.mean_answer_nll == pytest.approx(got.mean_answer_nll, rel=1e-4)  # batching does not change it
    assert 0.0 <= with_acc.accuracy <= 1.0
    student.eval()
    res = evaluate(EvalConfig(data=str(data), untrained=True, model="unused", max_new_tokens=2, batch_size=4, out=str(tmp_path / "e")), student=student)
    assert res.mean_answer_nll == pytest.approx(got.mean_answer_nll, rel=1e-4)
    assert res.accuracy == pytest.approx(with_acc.accuracy)
    with pytest.raises(ValueError, match="no validation rows"):
        validate(student, [])


def test_validation_during_training_logs_and_keeps_the_best(cached, tmp_path, tiny_student):
    from kvkd.train.trainer import TrainConfig, train

    valid = cached["clean"]  # GSM8K test rows: not among the cached GSM8K-train rows
    cfg = TrainConfig(caches=[cached["cache"]], out=str(tmp_path / "run"), student=str(tiny_student), steps=3, batch_size=2,
                      lora_r=2, num_workers=0, lr=1e-2, warmup_steps=1, save_every=0, valid_data=valid, valid_every=2, valid_limit=2)
    train(cfg)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    logged = {e["step"]: e["valid_nll"] for e in log}
    assert logged[1] is None and isinstance(logged[2], float) and isinstance(logged[3], float)  # every 2 steps and the last
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert best["valid_nll"] == min(logged[2], logged[3]) and best["step"] in (2, 3) and best["rows"] == 2
    # RUN/best is a run folder: kvkd eval scores the kept student, with the logged NLL
    res = evaluate(EvalConfig(run=str(tmp_path / "run" / "best"), data=valid, limit=2, max_new_tokens=1))
    assert res.mean_answer_nll == pytest.approx(best["valid_nll"], rel=1e-4) and res.warnings == []
    # validation rows that were trained on are refused before training
    bad = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "bad"), "valid_data": cached["leaked"]})
    with pytest.raises(DataError, match="--valid-data .*leaked.jsonl: 1 of 2 validation rows are among the training rows"):
        train(bad)
    assert not (tmp_path / "bad").exists()


def test_plain_model_baselines_on_a_tiny_model(tiny_student, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = _write_rows(tmp_path / "rows.jsonl", ROWS[:3])
    for mode in ("nocot", "cot"):
        res = evaluate(EvalConfig(model=str(tiny_student), mode=mode, data=str(data), max_new_tokens=2, cot_max_new_tokens=3, batch_size=2))
        assert res.n == 3 and res.mode == mode and 0 < res.mean_answer_nll < 30
        assert Path(res.folder) == tmp_path / "evals" / f"rows-{mode}"
        preds = [json.loads(x) for x in Path(res.predictions).read_text().splitlines()]
        assert len(preds) == 3 and all(p["status"] in ("compared", "no_answer") for p in preds)
