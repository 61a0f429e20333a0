"""``kvkd sweep``: a tiny grid end to end (tiny models), the table's numbers, resume, and grid validation."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from kvkd.pipeline.extract import ExtractConfig, extract
from kvkd.sweep import SweepConfig, cell_dir, load_grid, run_sweep


def test_builtin_plan_grid_has_the_plan_rows():
    rows = load_grid("plan")
    names = [r["name"] for r in rows]
    assert names[:9] == ["1-no-distill", "2-single-teacher-kv", "3-fixed", "4-similarity", "5-learnable", "6-learnable+attn-kv",
                         "7-learnable+attn-kv+cka", "8-govern", "9-difficulty"]
    assert {"ca-mkd", "ae-kd", "grad-cosine", "mtkd-rl"} <= set(names)
    assert rows[0]["train"]["a1"] == 0 and rows[0]["train"]["a2"] == 0 and rows[1]["teachers"] == "first"
    assert rows[6]["train"]["kv_weighting"] == "importance" and rows[6]["train"]["a3"] > 0


@pytest.mark.parametrize("text,match", [
    ('[{"name": "a", "train": {"nope": 1}}]', "unknown training options"),
    ('[{"name": "a"}, {"name": "a"}]', "unique name"),
    ('[{"name": "a", "teachers": "some"}]', "teachers must be"),
    ('{"x": 1}', "list of rows"),
    ('[{"name": "a", "sft": {"mode": "latent"}}]', "an sft row is"),
    ('[{"name": "a", "sft": {"mode": "cot"}, "train": {"router": "fixed"}}]', "an sft row is"),
    ('[{"name": "a", "sft": {"mode": "cot", "router": "fixed"}}]', "unknown sft options"),
])
def test_bad_grids_are_refused(tmp_path, text, match):
    path = tmp_path / "grid.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_grid(str(path))


@pytest.mark.slow
def test_tiny_grid_end_to_end_and_resume(tmp_path, shared_data, tiny_teacher, tiny_student):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:8]) + "\n")
    caches = []
    for trace in ("nl", "equations"):
        extract(ExtractConfig(model=str(tiny_teacher), data=str(data), out=str(tmp_path / f"{trace}.zarr"), slots=3, batch_size=8, trace=trace, trace_fallback="nl"))
        caches.append(str(tmp_path / f"{trace}.zarr"))
    grid = tmp_path / "grid.yaml"
    grid.write_text("rows:\n  - {name: single, teachers: first, train: {router: fixed}}\n  - {name: govern-cka, train: {router: govern, a3: 1.0}}\n")
    cfg = SweepConfig(grid=str(grid), caches=caches, out=str(tmp_path / "sweep"), seeds=[0, 1], student=str(tiny_student), steps=2,
                      batch_size=4, warmup_steps=1, train={"lora_r": 4, "num_workers": 0},
                      evals=[f"gsm8k={shared_data / 'gsm8k' / 'test.jsonl'}"], eval_limit=3)
    events = []
    result = run_sweep(cfg, on_cell=lambda r, s, st: events.append((r, s, st)))
    assert [e for e in events if e[2] == "done"] == [("single", 0, "done"), ("single", 1, "done"), ("govern-cka", 0, "done"), ("govern-cka", 1, "done")]
    cells = {(c["row"], c["seed"]): c for c in result["cells"]}
    assert len(cells) == 4
    single = json.loads(next((tmp_path / "sweep" / "cells" / "single").glob("seed-0-*/config.json")).read_text())
    assert len(single["caches"]) == 1 and single["steps"] == 2 and single["seed"] == 0
    both = json.loads(next((tmp_path / "sweep" / "cells" / "govern-cka").glob("seed-1-*/config.json")).read_text())
    assert len(both["caches"]) == 2 and both["router"] == "govern" and both["a3"] == 1.0 and both["seed"] == 1
    # the table's mean over seeds is the mean of the cells
    rows = list(csv.reader(open(tmp_path / "sweep" / "results.csv")))
    header, body = rows[0], {r[0]: r for r in rows[1:]}
    nll = [cells[("govern-cka", s)]["evals"]["gsm8k"]["mean_answer_nll"] for s in (0, 1)]
    mean = sum(nll) / 2
    assert float(body["govern-cka"][header.index("gsm8k_nll_mean")]) == pytest.approx(mean)
    assert (tmp_path / "sweep" / "results.md").read_text().count(f"{mean:.3f} ± ") == 1
    assert all(c["peak_rss_mb"] > 50 and c["train_wall_s"] > 0 for c in cells.values())
    assert (tmp_path / "sweep" / "loss.png").stat().st_size > 0 and (tmp_path / "sweep" / "weights.png").stat().st_size > 0
    # a kill during a trained cell's evaluation: the rerun evaluates it again without retraining
    cell = next((tmp_path / "sweep" / "cells" / "single").glob("seed-1-*"))
    before = json.loads((cell / "cell.json").read_text())
    log = (cell / "log.jsonl").read_text()
    (cell / "cell.json").unlink()
    events.clear()
    run_sweep(cfg, on_cell=lambda r, s, st: events.append((r, s, st)))
    assert [e for e in events if e[2] != "skipped"] == [("single", 1, "start"), ("single", 1, "done")]
    after = json.loads((cell / "cell.json").read_text())
    assert (cell / "log.jsonl").read_text() == log
    for k in ("train_wall_s", "mean_step_s", "peak_rss_mb", "final_loss", "mean_weights"):
        assert after[k] == before[k], k
    assert after["evals"]["gsm8k"]["mean_answer_nll"] == pytest.approx(before["evals"]["gsm8k"]["mean_answer_nll"])
    # other options make other cells: nothing is skipped, the old cells stay
    events.clear()
    run_sweep(dataclasses.replace(cfg, steps=3, rows=["single"], seeds=[0]), on_cell=lambda r, s, st: events.append((r, s, st)))
    assert events == [("single", 0, "start"), ("single", 0, "done")]
    assert len(list((tmp_path / "sweep" / "cells" / "single").glob("seed-0-*"))) == 2


def test_grid_router_names_and_options_checked_up_front(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text('[{"name": "a", "train": {"router": "simlarity"}}]')
    with pytest.raises(ValueError, match="row a: unknown router 'simlarity'"):
        load_grid(str(path))
    path.write_text('[{"name": "a", "train": {"router": "similarity", "router_options": {"temprature": 1}}}]')
    with pytest.raises(ValueError, match=r"no option\(s\) \['temprature'\]; its options: \['temperature'\]"):
        load_grid(str(path))


def test_missing_eval_set_refused_before_any_cell(tmp_path):
    cache = tmp_path / "c.zarr"
    cache.mkdir()
    cfg = SweepConfig(grid="plan", caches=[str(cache)], out=str(tmp_path / "out"), evals=[f"gsm8k={tmp_path / 'nope'}"])
    with pytest.raises(ValueError, match="eval set gsm8k: .* does not exist"):
        run_sweep(cfg)
    assert not (tmp_path / "out").exists()


def test_a_cell_is_keyed_by_the_options_that_define_it(tmp_path):
    cfg = SweepConfig(caches=[str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")], out=str(tmp_path / "out"), steps=4)
    row = {"name": "r", "train": {"router": "fixed"}}
    base = cell_dir(cfg, row, 0)
    assert base.parent == tmp_path / "out" / "cells" / "r" and base.name.startswith("seed-0-")
    assert cell_dir(dataclasses.replace(cfg, num_threads=3, device="cpu"), row, 0) == base  # how it runs: same cell
    for other in (dataclasses.replace(cfg, steps=8), dataclasses.replace(cfg, lr=1e-3), dataclasses.replace(cfg, train={"lora_r": 8})):
        assert cell_dir(other, row, 0) != base
    assert cell_dir(cfg, {"name": "r", "train": {"router": "similarity"}}, 0) != base and cell_dir(cfg, row, 1) != base


def test_a_cell_whose_sweep_died_before_it_armed_the_parent_death_signal_exits_at_once(tmp_path):
    """The window between spawn and PR_SET_PDEATHSIG: the cell finds its parent gone and does no work."""
    code = ("import sys; from kvkd.sweep import _run_cell\n"
            "_run_cell('{}', '{}', 0, sys.argv[1], parent_pid=1)\n")  # pid 1 is not our parent: 'the sweep died'
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cell")], capture_output=True, text=True, env={**os.environ}, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert not (tmp_path / "cell").exists()


def test_results_csv_is_numeric(tmp_path):
    """Hand-made cells: the CSV holds plain numbers a table library loads, the Markdown mean ± std."""
    from kvkd.sweep import write_report

    def cell(row, seed, correct, nll, weights):
        ev = {"gsm8k": {"n": 10, "correct": correct, "accuracy": correct / 10, "mean_answer_nll": nll}}
        d = tmp_path / "cells" / row / f"seed-{seed}"
        d.mkdir(parents=True)
        (d / "cell.json").write_text(json.dumps({"row": row, "seed": seed, "evals": ev, "train_wall_s": 10.0 + seed, "mean_step_s": 0.5,
                                                 "peak_rss_mb": 100.0, "mean_weights": weights}))

    cell("single", 0, 2, 3.0, [1.0])
    cell("single", 1, 4, 2.0, [1.0])
    cell("pair", 0, 5, 1.5, [0.25, 0.75])
    rows = [{"name": "single", "teachers": "first"}, {"name": "pair", "train": {"router": "similarity"}}]
    folders = {(r, s): tmp_path / "cells" / r / f"seed-{s}" for r in ("single", "pair") for s in (0, 1)}
    result = write_report(tmp_path, rows, [0, 1], folders)
    got = list(csv.DictReader(open(result["csv"])))
    single, pair = got
    assert single["row"] == "single" and single["seeds"] == "2" and single["teachers"] == "first"
    assert float(single["gsm8k_acc_mean"]) == pytest.approx(0.3) and float(single["gsm8k_acc_std"]) == pytest.approx(0.1414213562)
    assert single["gsm8k_n"] == "10" and float(single["gsm8k_nll_mean"]) == pytest.approx(2.5)
    lo, hi = float(single["gsm8k_acc_ci_low"]), float(single["gsm8k_acc_ci_high"])
    assert (lo, hi) == (pytest.approx(0.1455, abs=1e-4), pytest.approx(0.5190, abs=1e-4))  # Wilson, 6 of 20 pooled
    assert float(single["train_wall_s"]) == pytest.approx(10.5) and single["weight_t1"] == ""
    assert pair["router"] == "similarity" and float(pair["gsm8k_acc_std"]) == 0.0 and float(pair["weight_t1"]) == 0.75
    assert "| single | fixed | first | 2 | 30.0 ± 14.1 | 2.500 ± 0.707 |" in result["table"]
    # pair seed 1 is missing: said loudly, not only by a seeds column
    assert result["missing"] == ["pair seed 1"] and single["missing_seeds"] == "" and pair["missing_seeds"] == "1"
    assert result["table"].startswith("**INCOMPLETE: 1 of 4 cells missing (pair seed 1)")
    assert "| pair | similarity | all | 1 (MISSING seed 1) |" in result["table"]
    assert (tmp_path / "results.md").read_text().startswith("**INCOMPLETE")
    rows.append({"name": "absent"})  # a row with no cell at all is listed, not dropped
    folders.update({("absent", s): tmp_path / "cells" / "absent" / f"seed-{s}" for s in (0, 1)})
    result = write_report(tmp_path, rows, [0, 1], folders)
    assert result["missing"] == ["pair seed 1", "absent seed 0", "absent seed 1"]
    assert "| absent | fixed | all | 0 (MISSING seed 0 1) | MISSING |" in result["table"]
    absent = list(csv.DictReader(open(result["csv"])))[2]
    assert absent["row"] == "absent" and absent["seeds"] == "0" and absent["missing_seeds"] == "0 1" and absent["gsm8k_acc_mean"] == ""


def test_kava_table_grid_rows_are_valid_training_options():
    from kvkd.sweep import load_grid

    rows = {r["name"]: r for r in load_grid("kava-table")}  # validates every option name and router
    assert rows["codi"]["train"]["a2"] == 0.0 and rows["codi"]["teachers"] == "first"  # CODI: hidden loss only
    assert rows["kava-1-teacher"]["teachers"] == "first" and "a2" not in rows["kava-1-teacher"]["train"]
    assert sum(r.get("teachers", "all") == "all" and "sft" not in r for r in rows.values()) == 4
    assert list(rows)[:2] == ["cot-sft", "nocot-sft"] and rows["cot-sft"]["sft"] == {"mode": "cot"} and rows["nocot-sft"]["sft"] == {"mode": "nocot"}


@pytest.mark.slow  # two kvkd sft cells and one latent cell, each trained and evaluated in its own process
def test_kava_table_sft_rows_train_with_kvkd_sft_and_evaluate_in_their_mode(tmp_path, shared_data, tiny_teacher, tiny_student):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:8]) + "\n")
    extract(ExtractConfig(model=str(tiny_teacher), data=str(data), out=str(tmp_path / "t.zarr"), slots=3, batch_size=8))
    cfg = SweepConfig(grid="kava-table", rows=["cot-sft", "nocot-sft", "kava-1-teacher"], caches=[str(tmp_path / "t.zarr")], out=str(tmp_path / "sweep"),
                      seeds=[0], student=str(tiny_student), steps=2, batch_size=4, warmup_steps=1, train={"lora_r": 4, "num_workers": 0},
                      evals=[f"gsm8k={shared_data / 'gsm8k' / 'test.jsonl'}"], eval_limit=2)
    result = run_sweep(cfg)
    cells = {c["row"]: c for c in result["cells"]}
    assert set(cells) == {"cot-sft", "nocot-sft", "kava-1-teacher"}
    for row, mode in (("cot-sft", "cot"), ("nocot-sft", "nocot")):
        run = cell_dir(cfg, {"name": row, "sft": {"mode": mode}}, 0)
        recorded = json.loads((run / "config.json").read_text())
        assert recorded["mode"] == mode and recorded["model"] == str(tiny_student) and recorded["steps"] == 2 and recorded["lora_r"] == 4
        assert recorded["data"] == str(data) and recorded["limit"] == 8 and recorded["seed"] == 0  # the cache's rows
        ev = cells[row]["evals"]["gsm8k"]
        assert ev["n"] == 2 and ev["mode"] == mode  # evaluated in its decoding mode, on the exported model
        assert (run / "evals" / f"gsm8k-{mode}" / "metrics.json").is_file()  # inside the cell folder
        assert cells[row]["mean_weights"] == [] and cells[row]["final_loss"] == json.loads((run / "summary.json").read_text())["final_loss"]
    assert cell_dir(cfg, {"name": "x", "sft": {"mode": "cot"}}, 0).name != cell_dir(cfg, {"name": "x", "sft": {"mode": "cot", "lr": 1e-3}}, 0).name
    lines = (tmp_path / "sweep" / "results.md").read_text()
    assert "| cot-sft | sft-cot | none | 1 |" in lines and "| nocot-sft | sft-nocot | none | 1 |" in lines and "| kava-1-teacher | fixed | first | 1 |" in lines
    with open(tmp_path / "sweep" / "results.csv") as fh:
        assert [r["router"] for r in csv.DictReader(fh)] == ["sft-cot", "sft-nocot", "fixed"]
