"""The CLI end to end on tiny random models: extract two teachers, train a few steps, eval,
inspect the cache; bad input gets a clear error."""

import json
import re

import pytest
from typer.testing import CliRunner

from kvkd.cli import app

from .conftest import SHARED_DATA as SHARED

runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def rows(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("cli")
    (root / "train.jsonl").write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:8]) + "\n")
    (root / "test.jsonl").write_text("\n".join((shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:4]) + "\n")
    return root


def test_extract_train_eval_end_to_end(rows, tiny_teacher, tiny_student, tmp_path):
    caches = []
    for trace in ("nl", "equations"):
        out = tmp_path / f"{trace}.zarr"
        text = _ok(["extract", "--model", str(tiny_teacher), "--data", str(rows / "train.jsonl"), "--out", str(out),
                    "--trace", trace, "--trace-fallback", "nl", "--slots", "3", "--batch-size", "4"])
        assert "bytes_per_example" in text and "tokens_per_s" in text
        caches += ["--cache", str(out)]
    info = _ok(["cache", "info", str(tmp_path / "nl.zarr"), "--json"])
    assert '"num_written": 8' in info
    assert "cache OK" in _ok(["cache", "verify", str(tmp_path / "nl.zarr")])
    cfg = tmp_path / "train.yaml"
    cfg.write_text("train:\n  steps: 2\n  batch_size: 4\n  lora_r: 4\n  num_workers: 0\n")
    run = tmp_path / "run"
    text = _ok(["train", *caches, "--student", str(tiny_student), "--out", str(run), "--router", "learnable", "--config", str(cfg), "--steps", "3"])
    assert "teachers" in text and text.count("shared") >= 2  # per-teacher table: both share the student's tokenizer
    # not a terminal: plain progress lines (first step and the last), not a live bar
    progress = [ln for ln in text.splitlines() if re.match(r"^\d\d:\d\d:\d\d train \d+/3 loss ", ln)]
    assert [ln.split()[2] for ln in progress] == ["1/3", "3/3"], text
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3  # the flag overrides the file's 2 steps
    assert json.loads((run / "config.json").read_text())["router"] == "learnable"
    text = _ok(["eval", "--run", str(run), "--data", str(rows / "test.jsonl")])
    assert "| 4 |" in text
    folders = list((run / "evals").iterdir())  # one folder per evaluation, named after the data set
    assert len(folders) == 1 and folders[0].name.endswith("-test") and f"metrics: {folders[0] / 'metrics.json'}" in text.replace("\n", "")
    assert json.loads((folders[0] / "metrics.json").read_text())["n"] == 4
    preds = [json.loads(x) for x in (folders[0] / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and all({"id", "gold", "prediction", "correct", "answer_nll"} <= p.keys() for p in preds)


def test_same_cache_twice_is_noted(rows, tiny_teacher, tiny_student, tmp_path, monkeypatch):
    from kvkd.train.trainer import repeated_caches

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "t.zarr"
    _ok(["extract", "--model", str(tiny_teacher), "--data", str(rows / "train.jsonl"), "--out", str(out), "--slots", "2", "--batch-size", "8"])
    assert repeated_caches([str(out), "t.zarr/", "./x/../t.zarr", "s3://b/c", "s3://b/c/", "s3://b/d"]) == {str(out): [0, 1, 2], "s3://b/c": [3, 4]}
    text = _ok(["train", "--cache", str(out), "--cache", "t.zarr/", "--student", str(tiny_student), "--out", str(tmp_path / "run"),
                "--steps", "1", "--batch-size", "4", "--lora-r", "4", "--workers", "0"])
    assert f"note: the cache {out} is given 2 times (teachers 0, 1): it counts as 2 teachers" in text.replace("\n", " "), text
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])["weights"] == [0.5, 0.5]  # trained as two teachers
    text = _ok(["train", "--cache", str(out), "--student", str(tiny_student), "--out", str(tmp_path / "run1"),
                "--steps", "1", "--batch-size", "4", "--lora-r", "4", "--workers", "0"])
    assert "note: the cache" not in text


def test_clear_errors(rows, tiny_teacher, tmp_path):
    r = runner.invoke(app, ["extract", "--model", str(tmp_path / "nope"), "--data", str(rows / "train.jsonl"), "--out", str(tmp_path / "x.zarr")])
    assert r.exit_code == 2 and "error" in r.output
    no_eq = tmp_path / "no_eq.jsonl"  # GSM8K train row 29 has no calculator notes
    no_eq.write_text((SHARED / "gsm8k" / "train.jsonl").read_text().splitlines()[29] + "\n")
    r = runner.invoke(app, ["extract", "--model", str(tiny_teacher), "--data", str(no_eq), "--out", str(tmp_path / "y.zarr"), "--trace", "equations"])
    assert r.exit_code == 2 and "trace-fallback" in r.output.replace("\n", "")
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "--cache" in r.output
    r = runner.invoke(app, ["cache", "info", str(tmp_path / "missing.zarr")])
    assert r.exit_code == 2


def test_help_lists_every_command():
    text = _ok(["--help"])
    for cmd in ("extract", "train", "eval", "cache", "demo"):
        assert cmd in text
    assert "KV slots" in _ok(["extract", "--help"])
