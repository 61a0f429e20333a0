"""benchmarks/router_truth.py: each planted scenario's truth is what it claims (read back from
the extracted caches' traces), and the benchmark runs end to end on tiny models (oracle scores
1.0, fixed exactly the share of good teachers)."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import router_truth as RT  # noqa: E402

from kvkd.data import build_trace, load_examples  # noqa: E402
from kvkd.train.routers.truth import read_truth  # noqa: E402

STEPS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]  # reasoning steps of 16 rows


def test_derangement_has_no_fixed_point_and_is_a_permutation():
    for n in (2, 3, 16, 31):
        d = RT.derangement(n)
        assert sorted(d) == list(range(n)) and all(d[i] != i for i in range(n))
    with pytest.raises(ValueError):
        RT.derangement(1)


@pytest.mark.parametrize("K", [2, 3, 4])
def test_corrupted_one_teacher_bad_on_every_row(K):
    good = torch.tensor(RT.plant(f"corrupted-k{K}", STEPS).good)
    assert good.shape == (16, K)
    assert good[:, : K - 1].all() and not good[:, K - 1].any()


@pytest.mark.parametrize("third", ["", "-good", "-bad"])
def test_complementary_split_by_reasoning_steps(third):
    name = "complementary-k2" if not third else f"complementary-k3{third}"
    sc = RT.plant(name, STEPS)
    good = torch.tensor(sc.good)
    X = sorted(range(16), key=lambda n: (STEPS[n], n))[:8]  # the shorter half
    inX = torch.zeros(16, dtype=torch.bool)
    inX[X] = True
    assert torch.equal(good[:, 0], inX) and torch.equal(good[:, 1], ~inX)
    assert max(STEPS[n] for n in X) <= min(STEPS[n] for n in range(16) if n not in X)
    if third:
        assert bool(good[:, 2].all()) == (third == "-good") and bool((~good[:, 2]).all()) == (third == "-bad")


@pytest.mark.parametrize("p", [25, 50, 75])
def test_graded_known_fraction_nested(p):
    good = torch.tensor(RT.plant(f"graded-p{p}", STEPS).good)
    assert good[:, 0].all() and int((~good[:, 1]).sum()) == round(p / 100 * 16)
    if p > 25:  # nested: rows bad at a lower p stay bad
        lower = torch.tensor(RT.plant(f"graded-p{p - 25}", STEPS).good)
        assert bool((~good[:, 1] | lower[:, 1]).all())


def test_distinct_two_good_teachers_read_different_kinds_of_trace():
    sc = RT.plant("distinct-k3", STEPS)
    good = torch.tensor(sc.good)
    assert good[:, :2].all() and not good[:, 2].any()
    assert sc.trace_kinds == ["nl", "equations", "nl"] and RT.plant("corrupted-k3", STEPS).trace_kinds == ["nl"] * 3
    assert sc.sources[2] == RT.plant("corrupted-k3", STEPS).sources[2]  # the same bad teacher (its cache is shared)


def test_planted_trace_kinds(shared_data):
    ex = load_examples(str(shared_data / "gsm8k" / "train.jsonl"), fmt="jsonl", limit=1).examples[0]
    assert RT.planted_trace(ex) == ex.cot
    assert RT.planted_trace(ex, "equations") == "<<48/2=24>>\n<<48+24=72>>"
    with pytest.raises(ValueError, match="no calculator equations"):
        RT.planted_trace(type(ex)(ex.id, ex.question, ex.cot, ex.answer), "equations")
    with pytest.raises(ValueError, match="unknown planted trace kind"):
        RT.planted_trace(ex, "latex")
    # the nl teachers' names do not change with kinds; an equations teacher with the same sources is another teacher
    a = RT.planted_header([ex], [0], {"source": None, "format": "jsonl", "split": None, "offset": 0})
    b = RT.planted_header([ex], [0], {"source": None, "format": "jsonl", "split": None, "offset": 0}, kind="equations")
    assert a["teacher"]["spec"] == "planted-" + __import__("hashlib").sha256(b"[0]").hexdigest()[:16] and "trace_kind" not in a["teacher"]
    assert b["teacher"]["spec"] != a["teacher"]["spec"] and b["teacher"]["trace_kind"] == "equations"


def test_import_results_seeds_the_work_folder_and_refuses_other_settings(tmp_path):
    import argparse

    settings = {"teacher": "smollm2", "student": "smollm2", "data": str(tmp_path / "d.jsonl"), "rows": 16, "eval_rows": 8, "slots": 4,
                "steps": 8, "batch_size": 2, "lr": 2e-4, "lora_r": 8}
    run = {"router": "fixed", "scenario": "corrupted-k3", "seed": 1, "final_accuracy": 0.667, "heldout_nll": 2.7, "accuracy_per_step": [0.667]}
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"args": settings, "data_fingerprint": "fp1", "results": [run, {**run, "seed": 2}]}))
    runs, args = tmp_path / "runs", argparse.Namespace(**settings)
    kept = runs / "corrupted-k3" / "fixed" / "seed2" / "result.json"
    kept.parent.mkdir(parents=True)
    kept.write_text('{"mine": 1}')
    assert RT.import_results(old, args, "fp1", runs) == 1  # seed 2 is already here: kept
    got = json.loads((runs / "corrupted-k3" / "fixed" / "seed1" / "result.json").read_text())
    assert got["imported_from"] == str(old) and got["heldout_nll"] == 2.7 and json.loads(kept.read_text()) == {"mine": 1}
    with pytest.raises(ValueError, match="--steps 8, this call 4"):
        RT.import_results(old, argparse.Namespace(**{**settings, "steps": 4}), "fp1", runs)
    with pytest.raises(ValueError, match="--data fp1, this call fp2"):  # the rows, not the path, must match
        RT.import_results(old, args, "fp2", runs)
    old.write_text("{}")
    with pytest.raises(ValueError, match="not a results.json"):
        RT.import_results(old, args, "fp1", runs)


def test_unknown_scenario_named():
    with pytest.raises(ValueError, match="corrupted-k3"):
        RT.plant("corrupted-k9", STEPS)


def _rows(shared_data, tmp_path, n):
    src = tmp_path / "gsm8k.jsonl"
    src.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:n]) + "\n")
    return src


@pytest.mark.parametrize("name", ["complementary-k3-bad", "distinct-k3"])
def test_planted_traces_read_back_from_the_caches(shared_data, tmp_path, tiny_teacher, name):
    """Extract every planted teacher of the scenario and read back, from each cache's recorded
    data, the trace it read on every row: the truth file's trace_from, and good iff own."""
    from dataclasses import replace
    from kvkd.cache.reader import CacheReader
    from kvkd.train.routers.learnability import teacher_traces

    from kvkd.data import dataset_fingerprint
    from kvkd.traces import read_trace_file

    data = _rows(shared_data, tmp_path, 8)
    examples = load_examples(str(data), fmt="jsonl").examples
    sc = RT.plant(name, [RT.reasoning_steps(ex) for ex in examples])
    files, truth_path = RT.write_planted(tmp_path / "planted", examples, sc, {"source": str(data), "format": "jsonl"})
    assert len(set(files)) == 3
    urls = RT.extract_planted(files, tmp_path / "work", str(tiny_teacher), slots=2)
    for f, url, src, kind in zip(files, urls, sc.sources, sc.trace_kinds):  # each cache records its planted trace file; the rows are the real data set's
        ds = CacheReader.open(url).metadata["dataset"]
        assert ds["format"] == "trace" and ds["fingerprint"] == dataset_fingerprint(examples) and ds["row_set"].startswith("all 8 rows")
        tf = read_trace_file(f)
        assert ds["trace_file"]["sha256"] == tf.identity()["sha256"] and ds["trace_file"]["teacher"] == tf.header["teacher"]["spec"]
        assert tf.header["data"]["source"] == str(data) and tf.header["teacher"]["own_rows"] == sum(s == n for n, s in enumerate(src))
        assert [ln["trace"] for ln in tf.lines] == [RT.planted_trace(examples[s], kind) for s in src]
    truth = read_truth(truth_path)
    assert truth.ids == [ex.id for ex in examples] and truth.teachers == sc.teachers
    by_id = {ex.id: ex for ex in examples}
    as_read = lambda ex, kind: build_trace(replace(ex, cot=RT.planted_trace(ex, kind)), "nl", drop_last_step=True)  # noqa: E731
    for k, (url, kind) in enumerate(zip(urls, sc.trace_kinds)):
        meta = CacheReader.open(url).metadata
        read = teacher_traces(examples, meta)  # what the teacher actually read, rebuilt from its cache's data
        for n, ex in enumerate(examples):
            src = by_id[truth.trace_from[n][k]]
            assert read[n] == as_read(src, kind) and (kind == "nl") == ("<<" not in read[n])
            assert bool(truth.good[n, k]) == (src.id == ex.id) == (read[n] == as_read(ex, kind))
    assert RT.extract_planted(files, tmp_path / "work", "no-such-model", slots=2) == urls  # reused, no model loaded
    # the NLL signal, by hand: rows where teacher k is the only good one, or the two others are
    from kvkd.cache.reader import CacheReader as R

    nll = torch.stack([torch.from_numpy(R.open(u).column("answer_nll") * R.open(u).column("answer_len")).double() for u in urls], 1)
    wins = [float(nll[n][truth.good[n]].min()) < float(nll[n][~truth.good[n]].min()) for n in range(len(examples))]
    sig = RT.nll_signal(urls, truth.good)
    assert sig["rows"] == len(examples) and sig["good_lowest"] == pytest.approx(sum(wins) / len(wins))


def test_planted_cache_via_the_trace_file_equals_the_old_data_file_cache(shared_data, tmp_path, tiny_teacher):
    """The planted teacher read from its trace file (kvkd extract --trace FILE --keep all) gives, array by array,
    the cache of the data file the benchmark wrote before (id, question, the planted cot, answer as JSONL)."""
    import numpy as np

    from kvkd.cache.reader import CacheReader
    from kvkd.pipeline.extract import ExtractConfig, extract

    data = _rows(shared_data, tmp_path, 8)
    examples = load_examples(str(data), fmt="jsonl").examples
    sc = RT.plant("graded-p50", [RT.reasoning_steps(ex) for ex in examples])
    files, _ = RT.write_planted(tmp_path / "planted", examples, sc, {"source": str(data), "format": "jsonl"})
    [url] = RT.extract_planted(files[1:], tmp_path / "work", str(tiny_teacher), slots=2)  # the teacher bad on half the rows
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps({"id": ex.id, "question": ex.question, "cot": examples[s].cot, "answer": ex.answer}) + "\n"
                           for ex, s in zip(examples, sc.sources[1])))
    extract(ExtractConfig(model=str(tiny_teacher), data=str(old), data_format="jsonl", out=str(tmp_path / "old.zarr"), slots=2, batch_size=8))
    new, ref = CacheReader.open(url), CacheReader.open(str(tmp_path / "old.zarr"))
    assert new.metadata["dataset"]["fingerprint"] == ref.metadata["dataset"]["fingerprint"]
    a, b = new.read(slice(0, 8)), ref.read(slice(0, 8))
    assert a.keys() == b.keys() and len(a) > 5
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert new.metadata["prompt"] == ref.metadata["prompt"] and new.metadata["layout"] == ref.metadata["layout"]


@pytest.mark.slow  # ~4 min on 2 shared cores: 18 tiny training runs
def test_benchmark_end_to_end_on_tiny_models(shared_data, tmp_path, tiny_teacher, tiny_student):
    data = _rows(shared_data, tmp_path, 12)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--routers", "oracle,fixed,min-ce,persyn,govern", "--scenario", "corrupted-k3,graded-p50", "--seeds", "0,1",
            "--teacher", str(tiny_teacher), "--student", str(tiny_student), "--data", str(data), "--rows", "8", "--eval-rows", "4",
            "--slots", "2", "--steps", "4", "--batch-size", "4", "--lora-r", "4", "--out", str(out), "--work", str(work)]
    assert RT.main(argv) == 0
    res = json.loads((out / "results.json").read_text())["results"]
    got = {(r["router"], r["scenario"], r["seed"]): r for r in res}
    assert ("govern", "graded-p50", 0) not in got and ("govern", "corrupted-k3", 0) in got  # K >= 3 only
    for seed in (0, 1):
        assert got[("oracle", "corrupted-k3", seed)]["accuracy_per_step"] == [1.0] * 4
        assert got[("oracle", "graded-p50", seed)]["final_accuracy"] == 1.0
        assert got[("fixed", "corrupted-k3", seed)]["accuracy_per_step"] == pytest.approx([2 / 3] * 4)
        # graded p=0.5 over 8 rows, batch 4 = one epoch per 2 steps: half the rows both good (1.0), half 0.5
        assert got[("fixed", "graded-p50", seed)]["final_accuracy"] == pytest.approx(0.75)
    for r in res:
        assert 0.0 <= r["final_accuracy"] <= 1.0 and r["heldout_nll"] > 0
    table = (out / "results.md").read_text()
    assert "| oracle | 1.000 ± 0.000 | 1.000 ± 0.000 |" in table and "| govern |" in table and "n/a (K=2)" in table
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["router"], r["scenario"]) for r in rows} == {(k[0], k[1]) for k in got}
    assert (out / "corrupted-k3.png").stat().st_size > 0 and (out / "graded-p50.png").stat().st_size > 0
    # finished runs are reused: a second call trains nothing and gives the same table body
    assert RT.main(argv) == 0
    assert (out / "results.md").read_text().split("\n", 2)[2] == table.split("\n", 2)[2]
    # another work folder rebuilds the same tables from the published results.json, training nothing
    (tmp_path / "published.json").write_bytes((out / "results.json").read_bytes())
    argv2 = [a if a != str(work) else str(tmp_path / "work2") for a in argv]
    argv2 = [a if a != str(out) else str(tmp_path / "out2") for a in argv2] + ["--report-only", "--import", str(tmp_path / "published.json")]
    assert RT.main(argv2) == 0
    table2 = (tmp_path / "out2" / "results.md").read_text()
    assert table2.split("\n", 2)[2] == table.split("\n", 2)[2] and f"{len(res)} of them imported from" in table2
    assert not list((tmp_path / "work2" / "runs").rglob("log.jsonl"))  # nothing trained
    assert RT.main(argv2[:-3] + ["--steps", "5", "--report-only", "--import", str(tmp_path / "published.json")]) == 2  # other settings: refused
