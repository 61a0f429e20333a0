"""``kvkd extract --trace FILE``: a teacher's own traces as the CoT, the trace file's identity in
the cache, caches of one row set combining, other row sets refused by training."""

import json

import numpy as np
import pytest

from kvkd.cache.errors import CacheMismatchError
from kvkd.cache.reader import CacheReader
from kvkd.data import dataset_fingerprint, load_examples
from kvkd.pipeline.extract import ExtractConfig, extract
from kvkd.traces import TraceWriter, read_trace_file


@pytest.fixture(scope="module")
def rows(tmp_path_factory, shared_data):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:6]) + "\n")
    return path


def write_traces(path, rows, correct_rows, teacher="tiny-a", seed=0):
    """A complete trace file over ``rows`` where the rows in ``correct_rows`` solved the question."""
    exs = load_examples(str(rows)).examples
    header = {"kvkd_traces": 1, "teacher": {"spec": teacher}, "engine": {"name": "hf", "version": "test"},
              "sampling": {"temperature": 0.0, "seed": seed, "samples": 1}, "prompt": {"template": "{question}"},
              "data": {"fingerprint": dataset_fingerprint(exs), "rows": len(exs)}}
    w = TraceWriter(path, header)
    lines = []
    for r, ex in enumerate(exs):
        ok = r in correct_rows
        trace = f"I think step by step about row {r}.\nFirst {r} + 1 = {r + 1}.\nThen we are done." if ok else "no idea"
        lines.append({"row": r, "id": ex.id, "sample": 0, "question": ex.question, "gold": ex.answer, "gold_cot": ex.cot,
                      "completion": trace + f"\nThe answer is: {ex.answer if ok else 0}", "trace": trace,
                      "answer": ex.answer if ok else "0", "correct": ok, "finish": "stop", "prompt_tokens": 10, "tokens": 20})
    w.append(lines)
    w.finish(len(exs), 1)
    return path


def _extract(out, tiny_teacher, **kw):
    cfg = dict(model=str(tiny_teacher), out=str(out), slots=4, batch_size=4, examples_per_shard=4)
    cfg.update(kw)
    extract(ExtractConfig(**cfg))
    return CacheReader.open(str(out))


def test_trace_file_extraction_equals_the_same_cot_as_data(rows, tmp_path, tiny_teacher):
    traces = write_traces(tmp_path / "t.jsonl", rows, {0, 2})
    r = _extract(tmp_path / "own.zarr", tiny_teacher, trace=str(traces))
    ds = r.metadata["dataset"]
    exs = load_examples(str(rows)).examples
    assert ds["fingerprint"] == dataset_fingerprint(exs)  # gold fallback keeps the rows: combines with gold-CoT caches
    assert ds["format"] == "trace" and ds["trace"] == "file" and ds["trace_selection"] == {"keep": "first-correct", "fallback": "gold"}
    assert ds["trace_fallback_ids"] == [exs[i].id for i in (1, 3, 4, 5)] and ds["row_set"].startswith("all 6 rows")
    tf = read_trace_file(traces)
    assert ds["trace_file"]["sha256"] == tf.identity()["sha256"] and ds["trace_file"]["teacher"] == "tiny-a"
    assert ds["trace_file"]["engine"] == {"name": "hf", "version": "test"} and ds["trace_file"]["sampling"]["seed"] == 0
    # round trip: the same rows written as a normalised JSONL with those CoTs give the same cache
    same = tmp_path / "same.jsonl"
    cots = {0: tf.lines[0]["trace"], 2: tf.lines[2]["trace"]}
    same.write_text("".join(json.dumps({"id": e.id, "question": e.question, "cot": cots.get(i, e.cot), "answer": e.answer}) + "\n" for i, e in enumerate(exs)))
    ref = _extract(tmp_path / "ref.zarr", tiny_teacher, data=str(same))
    a, b = r.read(slice(0, 6)), ref.read(slice(0, 6))
    for name in ("keys", "values", "hidden", "slot_pos", "cot_len", "answer_nll"):
        np.testing.assert_array_equal(a[name], b[name])
    gold = _extract(tmp_path / "gold.zarr", tiny_teacher, data=str(rows)).read(slice(0, 6))
    assert a["cot_len"][0] != gold["cot_len"][0] and a["cot_len"][1] == gold["cot_len"][1]  # own trace on row 0, gold on row 1


def test_caches_of_one_teacher_over_other_traces_are_told_apart(rows, tmp_path, tiny_teacher):
    first = write_traces(tmp_path / "a.jsonl", rows, {0})
    second = write_traces(tmp_path / "b.jsonl", rows, {0}, seed=1)  # other sampling, same teacher
    _extract(tmp_path / "c.zarr", tiny_teacher, trace=str(first))
    with pytest.raises(CacheMismatchError, match="trace_file"):  # resuming the store with other traces is refused
        _extract(tmp_path / "c.zarr", tiny_teacher, trace=str(second))


def test_training_refuses_mixed_row_sets_and_reads_trace_rows(rows, tmp_path, tiny_teacher):
    from kvkd.train.trainer import TrainConfig, load_training_examples, open_teachers

    traces = write_traces(tmp_path / "t.jsonl", rows, {0, 2})
    gold = tmp_path / "gold.zarr"
    _extract(gold, tiny_teacher, data=str(rows))
    _extract(tmp_path / "own.zarr", tiny_teacher, trace=str(traces))
    _extract(tmp_path / "skip.zarr", tiny_teacher, trace=str(traces), fallback="skip")
    readers, metas = open_teachers(TrainConfig(caches=[str(gold), str(tmp_path / "own.zarr")]))  # same rows: combine
    own = load_training_examples(TrainConfig(caches=[str(tmp_path / "own.zarr")]), metas[1])
    assert [e.id for e in own] == [e.id for e in load_examples(str(rows)).examples]
    skip_meta = CacheReader.open(str(tmp_path / "skip.zarr")).metadata
    assert skip_meta["dataset"]["rows"] == 2 and "4 rows without a correct trace dropped" in skip_meta["dataset"]["row_set"]
    exs = load_examples(str(rows)).examples
    assert [e.id for e in load_training_examples(TrainConfig(caches=[str(tmp_path / "skip.zarr")]), skip_meta)] == [exs[0].id, exs[2].id]
    assert skip_meta["dataset"]["trace_skipped_ids"] == [exs[i].id for i in (1, 3, 4, 5)]
    with pytest.raises(CacheMismatchError, match="different rows.*2 examples from 2 of 6 rows.*--fallback gold"):
        open_teachers(TrainConfig(caches=[str(gold), str(tmp_path / "skip.zarr")]))


def test_bad_trace_inputs_fail_with_one_clear_line(rows, tmp_path, tiny_teacher):
    traces = write_traces(tmp_path / "t.jsonl", rows, {0})
    with pytest.raises(ValueError, match="leave out --data"):
        _extract(tmp_path / "x.zarr", tiny_teacher, trace=str(traces), data=str(rows))
    with pytest.raises(ValueError, match="neither nl nor equations nor an existing trace file"):
        _extract(tmp_path / "y.zarr", tiny_teacher, trace=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="--keep/--fallback"):
        _extract(tmp_path / "z.zarr", tiny_teacher, data=str(rows), fallback="skip")
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(traces.read_bytes().rsplit(b"\n", 2)[0] + b"\n")  # end marker lost: an unfinished file
    with pytest.raises(ValueError, match="incomplete"):
        _extract(tmp_path / "w.zarr", tiny_teacher, trace=str(torn))
    assert not (tmp_path / "w.zarr").exists()
