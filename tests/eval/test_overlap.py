"""Tests for kvkd.eval.overlap: eval questions among the training rows are counted (same text
with another id, or the same id) and refused by train --eval-data and sweep before training."""

from __future__ import annotations

import json

import pytest

from kvkd.data import DataError, Example, load_examples
from kvkd.eval.overlap import find_overlap, question_key, refuse_cache_overlap, refuse_overlap, run_training_examples


def _ex(i, q):
    return Example(i, q, "", "1")


def test_find_overlap_hand_made():
    train = [_ex("t1", "Tom has 3 apples. How many?"), _ex("t2", "Ann runs 5 km."), _ex("shared-id", "x")]
    held = [
        _ex("e1", "  tom HAS 3 apples.\nHow many? "),  # same text, other id, other case and spacing
        _ex("shared-id", "a new question"),  # same id
        _ex("t2", "Ann runs 5 km."),  # both
        _ex("e4", "Tom has 4 apples. How many?"),  # one character differs: not the same question
    ]
    found = find_overlap(train, held)
    assert (found.rows, found.same_question, found.same_id, found.count) == (4, 2, 2, 3)
    assert found.ids == ["e1", "shared-id", "t2"] and bool(found)
    assert "3 of 4 evaluation rows are among the training rows (2 by question text, 2 by id): e1, shared-id, t2" in found.describe("evaluation rows", "the training rows")
    assert not find_overlap(train, [_ex("e9", "new")])
    assert question_key("A\u00a0 B\tc") == question_key("a b C")  # NFKC: no-break space is a space


def test_training_rows_of_a_run(cached, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"caches": [cached["cache"]]}))
    assert run_training_examples(run) == cached["rows"]
    export = tmp_path / "export"  # an export folder names its run
    export.mkdir()
    (export / "kvkd_latent.json").write_text(json.dumps({"run": str(run)}))
    assert run_training_examples(export) == cached["rows"]
    with pytest.raises(FileNotFoundError, match="cannot tell which rows trained"):
        run_training_examples(tmp_path / "nothing")


def test_train_eval_data_refused_before_training(cached, tmp_path, tiny_student):
    from kvkd.train.trainer import TrainConfig, train

    refuse_overlap(cached["rows"], cached["clean"])  # no overlap: nothing raised
    refuse_overlap(cached["rows"], "")
    cfg = TrainConfig(caches=[cached["cache"]], out=str(tmp_path / "run"), student=str(tiny_student), steps=1, batch_size=2,
                      lora_r=2, num_workers=0, eval_data=cached["leaked"])
    with pytest.raises(DataError, match=r"--eval-data .*leaked.jsonl: 1 of 2 evaluation rows are among the training rows \(1 by question text, 0 by id\): test-7"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_sweep_refuses_before_any_cell(cached, tmp_path):
    from kvkd.sweep import SweepConfig, run_sweep

    refuse_cache_overlap(cached["cache"], [("clean", cached["clean"], None)])
    cfg = SweepConfig(grid="plan", caches=[cached["cache"]], out=str(tmp_path / "out"), evals=[f"leaky={cached['leaked']}"])
    with pytest.raises(DataError, match=r"eval set leaky: 1 of 2 evaluation rows are among the rows of cache .*: test-7"):
        run_sweep(cfg)
    assert not (tmp_path / "out").exists()
