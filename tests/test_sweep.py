"""``kvkd sweep``: a tiny grid end to end (tiny models), the table's numbers, resume, and grid validation."""

import csv
import json

import pytest

from kvkd.pipeline.extract import ExtractConfig, extract
from kvkd.sweep import SweepConfig, load_grid, run_sweep


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
    single = json.loads((tmp_path / "sweep" / "cells" / "single" / "seed-0" / "config.json").read_text())
    assert len(single["caches"]) == 1 and single["steps"] == 2 and single["seed"] == 0
    both = json.loads((tmp_path / "sweep" / "cells" / "govern-cka" / "seed-1" / "config.json").read_text())
    assert len(both["caches"]) == 2 and both["router"] == "govern" and both["a3"] == 1.0 and both["seed"] == 1
    # the table's mean over seeds is the mean of the cells
    rows = list(csv.reader(open(tmp_path / "sweep" / "results.csv")))
    header, body = rows[0], {r[0]: r for r in rows[1:]}
    nll = [cells[("govern-cka", s)]["evals"]["gsm8k"]["mean_answer_nll"] for s in (0, 1)]
    mean = sum(nll) / 2
    assert body["govern-cka"][header.index("gsm8k NLL")].startswith(f"{mean:.3f} ± ")
    assert all(c["peak_rss_mb"] > 50 and c["train_wall_s"] > 0 for c in cells.values())
    assert (tmp_path / "sweep" / "loss.png").stat().st_size > 0 and (tmp_path / "sweep" / "weights.png").stat().st_size > 0
    # resume: only the missing cell runs again
    (tmp_path / "sweep" / "cells" / "single" / "seed-1" / "cell.json").unlink()
    events.clear()
    run_sweep(cfg, on_cell=lambda r, s, st: events.append((r, s, st)))
    assert [e for e in events if e[2] != "skipped"] == [("single", 1, "start"), ("single", 1, "done")]


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


def test_kava_table_grid_rows_are_valid_training_options():
    from kvkd.sweep import load_grid

    rows = {r["name"]: r for r in load_grid("kava-table")}  # validates every option name and router
    assert rows["codi"]["train"]["a2"] == 0.0 and rows["codi"]["teachers"] == "first"  # CODI: hidden loss only
    assert rows["kava-1-teacher"]["teachers"] == "first" and "a2" not in rows["kava-1-teacher"]["train"]
    assert sum(r.get("teachers", "all") == "all" for r in rows.values()) == 4
