"""``kvkd generate`` (hf engine) on a tiny random model: determinism under a seed, resume after
a kill mid-file, padding invariance of greedy decoding, answer extraction and ``correct``,
header mismatch refusal, and the trace file's selection (keep / fallback, fingerprints)."""

import json

import pytest

from kvkd.data import DataError, dataset_fingerprint, load_examples
from kvkd.generate import Completion, GenerateConfig, generate_traces, split_completion
from kvkd.models import load_model
from kvkd.traces import TraceFile, read_trace_file, select_examples


@pytest.fixture(scope="module")
def rows(tmp_path_factory, shared_data):
    path = tmp_path_factory.mktemp("gen") / "train.jsonl"
    path.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:6]) + "\n")
    return path


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_model(str(tiny_teacher))


def _cfg(rows, out, tiny_teacher, **kw):
    base = dict(model=str(tiny_teacher), data=str(rows), out=str(out), max_new_tokens=8, batch_size=4)
    base.update(kw)
    return GenerateConfig(**base)


def test_split_completion_cuts_the_final_answer_statement():
    text = "She sold 48/2 = 24 clips in May.\nSo 48+24 = 72 in all.\nThe answer is: 72."
    assert split_completion(text) == ("She sold 48/2 = 24 clips in May.\nSo 48+24 = 72 in all.", "72")
    assert split_completion("24 + 48 = 72. The answer is 72") == ("24 + 48 = 72.", "72")
    assert split_completion("We add 3 and 4 to get 7") == ("We add 3 and 4 to get 7", "7")  # no marker: all is trace
    assert split_completion("x = 1/2\nso $\\boxed{\\frac{1}{2}}$", "math") == ("x = 1/2", "\\frac{1}{2}")


def test_line_scores_answers_with_kvkds_checker(rows):
    from kvkd.generate import _line

    ex = load_examples(str(rows)).examples[0]  # gold 72
    good = _line(ex, 0, 0, Completion("48/2 = 24\n24 + 48 = 72\nThe answer is: 72", 20, "stop"), 50, "numeric")
    bad = _line(ex, 0, 1, Completion("48/2 = 24\nThe answer is: 24", 12, "stop"), 50, "numeric")
    assert good["correct"] is True and good["answer"] == "72" and good["trace"] == "48/2 = 24\n24 + 48 = 72"
    assert bad["correct"] is False and bad["answer"] == "24"


def test_same_seed_same_file_and_other_seed_differs(rows, tmp_path, tiny_teacher, teacher):
    a, b, c = (tmp_path / f"{n}.jsonl" for n in "abc")
    kw = dict(temperature=1.0, samples=2)
    s = generate_traces(_cfg(rows, a, tiny_teacher, **kw), loaded=teacher)
    generate_traces(_cfg(rows, b, tiny_teacher, **kw), loaded=teacher)
    generate_traces(_cfg(rows, c, tiny_teacher, seed=1, **kw), loaded=teacher)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    tf = read_trace_file(a)
    assert tf.complete and len(tf.lines) == 12 and s.traces == 12 and s.rows == 6
    assert [(ln["row"], ln["sample"]) for ln in tf.lines] == [(r, k) for r in range(6) for k in range(2)]
    # the two samples of one row differ (sampling, not copies)
    assert any(tf.lines[2 * r]["completion"] != tf.lines[2 * r + 1]["completion"] for r in range(6))
    assert tf.header["data"]["fingerprint"] == dataset_fingerprint(load_examples(str(rows)).examples)
    assert tf.header["sampling"]["seed"] == 0 and tf.header["engine"]["name"] == "hf"
    assert all(0 < ln["tokens"] <= 8 and ln["prompt_tokens"] > 10 for ln in tf.lines)


def test_resume_after_kill_mid_file_gives_the_uninterrupted_file(rows, tmp_path, tiny_teacher, teacher):
    full = tmp_path / "full.jsonl"
    kw = dict(temperature=1.0, samples=2, batch_size=2)
    generate_traces(_cfg(rows, full, tiny_teacher, **kw), loaded=teacher)
    want = full.read_bytes()

    # killed after the first batch (an exception from the progress callback), then resumed
    part = tmp_path / "part.jsonl"

    def kill(p):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_traces(_cfg(rows, part, tiny_teacher, **kw), loaded=teacher, on_progress=kill)
    with pytest.raises(DataError, match="incomplete"):
        read_trace_file(part)  # an interrupted file never reads as complete
    s = generate_traces(_cfg(rows, part, tiny_teacher, **kw), loaded=teacher)
    assert part.read_bytes() == want and s.traces_written == 8 and s.traces == 12

    # killed in the middle of writing a line: the torn line is cut off and redone
    torn = tmp_path / "torn.jsonl"
    lines = want.split(b"\n")
    torn.write_bytes(b"\n".join(lines[:4]) + b"\n" + lines[4][: len(lines[4]) // 2])
    assert len(read_trace_file(torn, require_complete=False).lines) == 3
    s = generate_traces(_cfg(rows, torn, tiny_teacher, **kw), loaded=teacher)
    assert torn.read_bytes() == want and s.traces_written == 9
    assert generate_traces(_cfg(rows, torn, tiny_teacher, **kw), loaded=teacher).traces_written == 0  # complete: nothing redone


def test_greedy_generation_does_not_depend_on_padding(rows, tmp_path, tiny_teacher, teacher):
    alone, batched = tmp_path / "one.jsonl", tmp_path / "four.jsonl"
    generate_traces(_cfg(rows, alone, tiny_teacher, batch_size=1, max_new_tokens=12), loaded=teacher)
    generate_traces(_cfg(rows, batched, tiny_teacher, batch_size=4, max_new_tokens=12), loaded=teacher)
    a, b = read_trace_file(alone).lines, read_trace_file(batched).lines
    assert len({ln["prompt_tokens"] for ln in a}) > 1  # prompts of different lengths: the batch is padded
    assert [ln["completion"] for ln in a] == [ln["completion"] for ln in b]


def test_other_settings_are_refused_not_mixed(rows, tmp_path, tiny_teacher, teacher):
    out = tmp_path / "t.jsonl"
    generate_traces(_cfg(rows, out, tiny_teacher), loaded=teacher)
    with pytest.raises(DataError, match="sampling.*--overwrite"):
        generate_traces(_cfg(rows, out, tiny_teacher, max_new_tokens=9), loaded=teacher)
    generate_traces(_cfg(rows, out, tiny_teacher, max_new_tokens=9, overwrite=True), loaded=teacher)
    assert read_trace_file(out).header["sampling"]["max_new_tokens"] == 9
    with pytest.raises(ValueError, match="--temperature"):
        generate_traces(_cfg(rows, out, tiny_teacher, samples=2), loaded=teacher)


def _fake_file(rows, verdicts):
    """A trace file whose row r, sample k is correct when verdicts[r][k]."""
    exs = load_examples(str(rows)).examples
    lines = []
    for r, (ex, vs) in enumerate(zip(exs, verdicts)):
        for k, ok in enumerate(vs):
            lines.append({"row": r, "id": ex.id, "sample": k, "question": ex.question, "gold": ex.answer, "gold_cot": ex.cot,
                          "completion": "", "trace": f"own trace {r}.{k}", "answer": ex.answer if ok else "0", "correct": ok,
                          "finish": "stop", "prompt_tokens": 1, "tokens": 1})
    return TraceFile("fake.jsonl", {}, lines, True), exs


def test_selection_keep_and_fallback(rows):
    tf, exs = _fake_file(rows, [[False, True], [True, True], [False, False], [True, False], [False, False], [False, True]])
    first, c = select_examples(tf, "first-correct", "gold")
    assert [e.cot for e in first] == ["own trace 0.1", "own trace 1.0", exs[2].cot, "own trace 3.0", exs[4].cot, "own trace 5.1"]
    assert c["own"] == 4 and c["gold"] == 2 and c["skipped"] == 0
    assert dataset_fingerprint(first) == dataset_fingerprint(exs)  # same rows: combines with gold-CoT caches
    every, c = select_examples(tf, "correct", "gold")
    assert [e.id for e in every][:3] == [exs[0].id, exs[1].id, f"{exs[1].id}#s1"] and c["examples"] == 7
    assert dataset_fingerprint(every) != dataset_fingerprint(exs)
    skipped, c = select_examples(tf, "first-correct", "skip")
    assert [e.id for e in skipped] == [exs[i].id for i in (0, 1, 3, 5)] and c["skipped"] == 2
    assert dataset_fingerprint(skipped) != dataset_fingerprint(exs)
    allx, c = select_examples(tf, "all", "skip")
    assert len(allx) == 12 and c["own"] == 6


def test_cli_generate_prints_solve_rate(rows, tmp_path, tiny_teacher):
    from typer.testing import CliRunner

    from kvkd.cli import app

    out = tmp_path / "cli.jsonl"
    r = CliRunner().invoke(app, ["generate", "--model", str(tiny_teacher), "--data", str(rows), "--out", str(out), "--max-new-tokens", "4", "--limit", "3"])
    assert r.exit_code == 0, r.output
    assert "solve rate" in r.output and "of 3 traces" in r.output
    assert json.loads(out.read_text().splitlines()[-1]) == {"kvkd_traces_end": {"lines": 3, "rows": 3, "samples": 1}}
    r = CliRunner().invoke(app, ["generate", "--model", str(tiny_teacher), "--data", str(rows), "--out", str(out), "--samples", "3"])
    assert r.exit_code == 2 and "--temperature" in r.output

