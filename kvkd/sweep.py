"""``kvkd sweep``: run a named experiment grid (rows x seeds), evaluate every run, and write
one comparison table and plots.

Every row trains on the same caches, data, steps and seeds; only the row's overrides of the
training options differ. A row with ``teachers: first`` uses the first cache only (the
single-teacher baseline). Each (row, seed) cell runs in a fresh subprocess, so its wall time
and peak memory (``ru_maxrss``; CUDA peak allocation on a GPU) are its own; a cell whose
``cell.json`` exists is skipped, and a cell killed half-way resumes from its run's newest
checkpoint, so a half-finished grid resumes where it stopped.

The built-in grid ``plan`` is the project plan's ablation ladder, each step adding one thing:
(1) no distillation (CE only, the same latent student), (2) single-teacher KV distillation
(KaVa), (3) multi-teacher with fixed uniform weights, (4) similarity router, (5) learnable
router, (6) + attention-weighted KV loss, (7) + CKA, (8) GOVERN and (9) the difficulty router
on top of (7); then CA-MKD, AE-KD, grad-cosine and MTKD-RL, also on top of (7). The grid
``kava-table`` holds the latent rows of KaVa's table: CODI (hidden-state loss only), KaVa with one
teacher, and multi-teacher rows (fixed, similarity, learnable + attention-weighted KV + CKA, GOVERN);
its text baselines (CoT-SFT, No-CoT-SFT) are ``kvkd sft`` + ``kvkd eval --mode cot|nocot``, not
cells yet.

Output folder::

    OUT/sweep.json                  resolved options and grid
    OUT/cells/ROW/seed-S/           the run folder (config, log.jsonl, checkpoints) + cell.json + eval-*.jsonl
    OUT/results.md, results.csv     mean +- std over seeds per row and eval set
    OUT/loss.png, weights.png       training loss per row; router weights per teacher over steps
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

from kvkd.config import ConfigError, RuntimeArgs, opt, override
from kvkd.train.options import OptimArgs, parse_key_values

from kvkd.eval.report import read_log

_ON_TOP_OF_7 = {"kv_weighting": "importance", "a3": 1.0}

GRIDS: dict[str, list[dict]] = {
    "plan": [
        {"name": "1-no-distill", "teachers": "first", "train": {"router": "fixed", "a1": 0.0, "a2": 0.0}},
        {"name": "2-single-teacher-kv", "teachers": "first", "train": {"router": "fixed"}},
        {"name": "3-fixed", "train": {"router": "fixed"}},
        {"name": "4-similarity", "train": {"router": "similarity"}},
        {"name": "5-learnable", "train": {"router": "learnable"}},
        {"name": "6-learnable+attn-kv", "train": {"router": "learnable", "kv_weighting": "importance"}},
        {"name": "7-learnable+attn-kv+cka", "train": {"router": "learnable", **_ON_TOP_OF_7}},
        {"name": "8-govern", "train": {"router": "govern", **_ON_TOP_OF_7}},
        {"name": "9-difficulty", "train": {"router": "difficulty", **_ON_TOP_OF_7}},
        {"name": "ca-mkd", "train": {"router": "ca-mkd", **_ON_TOP_OF_7}},
        {"name": "ae-kd", "train": {"router": "ae-kd", **_ON_TOP_OF_7}},
        {"name": "grad-cosine", "train": {"router": "grad-cosine", **_ON_TOP_OF_7}},
        {"name": "mtkd-rl", "train": {"router": "mtkd-rl", **_ON_TOP_OF_7}},
    ],
    # The latent rows of KaVa's Table (Kuzina et al. 2025): CODI = the hidden-state loss only, KaVa with
    # one teacher, then kvkd's multi-teacher rows. The text baselines of that table (CoT-SFT, No-CoT-SFT)
    # are not cells of this grid yet: run `kvkd sft --mode cot|nocot` and `kvkd eval --mode cot|nocot`.
    "kava-table": [
        {"name": "codi", "teachers": "first", "train": {"router": "fixed", "a2": 0.0}},
        {"name": "kava-1-teacher", "teachers": "first", "train": {"router": "fixed"}},
        {"name": "multi-fixed", "train": {"router": "fixed"}},
        {"name": "multi-similarity", "train": {"router": "similarity"}},
        {"name": "multi-learnable+attn-kv+cka", "train": {"router": "learnable", **_ON_TOP_OF_7}},
        {"name": "multi-govern", "train": {"router": "govern", **_ON_TOP_OF_7}},
    ],
}


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@dataclass
class SweepConfig(OptimArgs, RuntimeArgs):
    """Options of ``kvkd sweep`` (besides the optimiser options every row shares and runtime).

    Attributes:
        grid: a built-in grid name (``plan``) or a YAML/JSON file: a list of rows
            ``{name, teachers: all|first (default all), train: {TrainConfig overrides}}``
            (or a mapping with a ``rows`` list).
        caches: the teacher caches (every row uses all of them unless ``teachers: first``).
        out: output folder.
        rows: run only these rows (names), in grid order; empty = all.
        seeds: seeds; every row runs once per seed (``seed`` of the optimiser group is unused).
        student: the student every row trains.
        train: further TrainConfig options every row shares (e.g. ``{"lora_r": 8}``); a row's
            own overrides win.
        evals: evaluation sets, ``PATH`` or ``NAME=PATH`` (a file, or a folder read with
            ``eval_split``); MATH-like sets (name containing ``math``) are checked with
            math-verify, the others numerically.
        eval_split, eval_limit: split of folder eval sets and rows evaluated per set.
    """

    steps: int = override(OptimArgs, "steps", 48, "sized so a 13-row CPU grid finishes in hours; train's default is a real run")
    batch_size: int = override(OptimArgs, "batch_size", 4, "CPU-sized, like the demo")
    lr: float = override(OptimArgs, "lr", 5e-4, "higher for the short CPU runs, like the demo")
    warmup_steps: int = override(OptimArgs, "warmup_steps", 5, "about a tenth of --steps")
    grid: str = opt("plan", help="Built-in grid (plan, kava-table) or a YAML/JSON file of rows")
    caches: list[str] = opt(factory=list, cli="cache", help="A teacher cache; repeat for several teachers (the first is the single-teacher rows' teacher)")
    out: str = opt("sweep_out", help="Output folder (cells, results.md/.csv, loss.png, weights.png); resumed if present")
    rows: list[str] = opt(factory=list, cli_type=str, parse=_names, help="Comma-separated row names to run", default_text="all rows")
    seeds: list[int] = opt(factory=lambda: [0, 1], cli_type=str, parse=_ints, help="Comma-separated seeds; every row runs once per seed")
    student: str = opt("smollm2", help="Student spec every row trains")
    train: dict = opt(factory=dict, cli="train-option", cli_type=list[str], parse=lambda v: parse_key_values(v, "--train-option"),
                      help="Training option shared by every row, KEY=VALUE (JSON value), e.g. lora_r=8; repeatable")
    evals: list[str] = opt(factory=list, cli="eval", help="Evaluation set PATH or NAME=PATH (file, or folder read with --eval-split); repeatable")
    eval_split: str = opt("test", help="Split of folder eval sets")
    eval_limit: int | None = opt(40, help="Rows per eval set (none = all)")


@dataclass
class CellResult:
    """One (row, seed) cell: training figures and one EvalResult dict per eval set."""

    row: str
    seed: int
    run_dir: str
    train_wall_s: float
    mean_step_s: float
    peak_rss_mb: float
    peak_cuda_mb: float | None
    final_loss: float
    mean_weights: list[float]
    evals: dict


def load_grid(grid: str) -> list[dict]:
    """The rows of a built-in grid or of a YAML/JSON grid file.

    Raises:
        ValueError: unknown grid, a file that is not a list of rows, duplicate or missing
            names, ``teachers`` other than all/first, or a training option that does not exist.
    """
    from kvkd.train.trainer import TrainConfig, check_router_options

    if grid in GRIDS:
        rows = GRIDS[grid]
    elif Path(grid).is_file():
        text = Path(grid).read_text()
        if grid.endswith((".yaml", ".yml")):
            import yaml

            rows = yaml.safe_load(text)
        else:
            rows = json.loads(text)
        if isinstance(rows, dict):
            rows = rows.get("rows")
    else:
        raise ValueError(f"unknown grid {grid!r}: give a built-in grid ({', '.join(GRIDS)}) or a YAML/JSON file of rows")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"grid {grid}: expected a non-empty list of rows like {{name: ..., train: {{router: fixed}}}}")
    known = set(TrainConfig.__dataclass_fields__)
    names = set()
    for r in rows:
        name = r.get("name")
        if not name or name in names:
            raise ValueError(f"grid {grid}: every row needs a unique name (got {name!r})")
        names.add(name)
        if r.get("teachers", "all") not in ("all", "first"):
            raise ValueError(f"grid {grid}, row {name}: teachers must be 'all' or 'first', got {r.get('teachers')!r}")
        bad = set(r.get("train", {})) - known
        if bad:
            raise ValueError(f"grid {grid}, row {name}: unknown training options {sorted(bad)}; use TrainConfig's field names "
                             "(the `kvkd train` flags with _ for -, e.g. kv_weighting)")
        train_opts = r.get("train", {})
        try:
            check_router_options(train_opts.get("router", "fixed"), train_opts.get("router_options"), 0)
        except (KeyError, ValueError) as err:
            raise ValueError(f"grid {grid}, row {name}: {str(err).strip(chr(34))}") from None
    return rows


def _eval_sets(cfg: SweepConfig) -> list[tuple[str, str, str | None]]:
    """(name, path, split) per eval spec."""
    sets = []
    for spec in cfg.evals:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        p = Path(path)
        name = name or (p.name if p.is_dir() else p.parent.name if p.stem in ("test", "train", "valid") else p.stem)
        sets.append((name, path, cfg.eval_split if p.is_dir() else None))
    return sets


def _cell_configs(cfg: SweepConfig, row: dict, seed: int, cell_dir: Path):
    from kvkd.eval.evaluate import EvalConfig
    from kvkd.train.trainer import TrainConfig

    caches = cfg.caches[:1] if row.get("teachers", "all") == "first" else list(cfg.caches)
    shared = {f.name: getattr(cfg, f.name) for f in fields(OptimArgs) + fields(RuntimeArgs) if f.name != "seed"}
    opts = dict(student=cfg.student, save_every=max(1, cfg.steps // 4), **shared)
    opts.update(cfg.train)
    opts.update(row.get("train", {}))
    tcfg = TrainConfig(caches=caches, out=str(cell_dir), seed=seed, **opts)
    ecfgs = {
        name: EvalConfig(run=str(cell_dir), mode="latent", data=path, split=split, limit=cfg.eval_limit, seed=seed,
                         answer_check="math" if "math" in name.lower() else "numeric", out=str(cell_dir / f"eval-{name}.jsonl"),
                         num_threads=cfg.num_threads, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
        for name, path, split in _eval_sets(cfg)
    }
    return tcfg, ecfgs


def _run_cell(cfg_json: str, row_json: str, seed: int, cell_dir: str) -> None:
    """Subprocess body: train one cell, measure it, evaluate it, write cell.json atomically."""
    import resource
    import signal
    import sys

    if sys.platform.startswith("linux"):  # die with the sweep, even if it is killed outright
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    import torch

    from kvkd.eval.evaluate import evaluate
    from kvkd.train.trainer import train

    cfg = SweepConfig(**json.loads(cfg_json))
    if cfg.num_threads:  # this process is the cell's entry point: its global settings are ours to set
        torch.set_num_threads(cfg.num_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    row = json.loads(row_json)
    cell = Path(cell_dir)
    tcfg, ecfgs = _cell_configs(cfg, row, seed, cell)
    t = time.perf_counter()
    summary = train(tcfg)
    wall = time.perf_counter() - t
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    evals = {}
    for name, ecfg in ecfgs.items():
        res = evaluate(ecfg)
        res.name = name
        evals[name] = asdict(res)
    result = CellResult(row=row["name"], seed=seed, run_dir=str(cell), train_wall_s=wall, mean_step_s=summary.mean_step_s,
                        peak_rss_mb=peak_rss, peak_cuda_mb=peak_cuda, final_loss=summary.final_loss,
                        mean_weights=summary.mean_weights, evals=evals)
    tmp = cell / "cell.json.tmp"
    tmp.write_text(json.dumps(asdict(result), indent=2))
    os.replace(tmp, cell / "cell.json")


def run_sweep(cfg: SweepConfig, on_cell: Callable[[str, int, str], None] | None = None) -> dict:
    """Run (or resume) every cell of the grid, then write the table and plots.

    Args:
        on_cell: called as ``on_cell(row, seed, status)`` with status ``start``, ``done`` or
            ``skipped`` (already done).
    Returns:
        dict with ``table`` (Markdown), ``csv``, ``loss_png``, ``weights_png``, ``cells`` (CellResult dicts).
    Raises:
        ValueError: bad grid or options (no caches, no seeds, unknown row names).
        RuntimeError: a cell's subprocess failed (names the cell and its folder).
    """
    if not cfg.caches:
        raise ValueError("no teacher cache given: pass --cache PATH (repeat it for several teachers)")
    if not cfg.seeds:
        raise ValueError("no seeds given: pass --seeds 0,1")
    rows = load_grid(cfg.grid)
    if cfg.rows:
        unknown = set(cfg.rows) - {r["name"] for r in rows}
        if unknown:
            raise ValueError(f"rows {sorted(unknown)} are not in grid {cfg.grid}; its rows: {[r['name'] for r in rows]}")
        rows = [r for r in rows if r["name"] in cfg.rows]
    for name, path, _ in _eval_sets(cfg):
        if "://" not in path and not Path(path).exists():
            raise ValueError(f"eval set {name}: {path} does not exist (give a file or a data-set folder, e.g. --eval gsm8k=PATH/TO/gsm8k)")
    for c in cfg.caches:
        if "://" not in c and not Path(c).exists():
            raise ValueError(f"teacher cache {c} does not exist")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"config": asdict(cfg), "rows": rows}, indent=2))
    ctx = multiprocessing.get_context("spawn")
    say = on_cell or (lambda *_: None)
    for row in rows:
        for seed in cfg.seeds:
            cell = out / "cells" / row["name"] / f"seed-{seed}"
            if (cell / "cell.json").is_file():
                say(row["name"], seed, "skipped")
                continue
            say(row["name"], seed, "start")
            cell.mkdir(parents=True, exist_ok=True)
            proc = ctx.Process(target=_run_cell, args=(json.dumps(asdict(cfg)), json.dumps(row), seed, str(cell)))
            proc.start()
            try:
                proc.join()
            finally:  # interrupted: never leave a cell training on its own (a rerun would train it twice)
                if proc.is_alive():
                    proc.terminate()
                    proc.join(30)
            if proc.exitcode != 0 or not (cell / "cell.json").is_file():
                raise RuntimeError(f"sweep cell {row['name']} seed {seed} failed (exit code {proc.exitcode}); its run folder is {cell}. "
                                   "Rerun the same command to resume after fixing the cause.")
            say(row["name"], seed, "done")
    return write_report(out, rows, cfg.seeds)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def write_report(out: Path, rows: list[dict], seeds: list[int]) -> dict:
    """Aggregate the cells of ``out`` into results.md / results.csv / loss.png / weights.png."""
    cells = {}
    for row in rows:
        for seed in seeds:
            path = out / "cells" / row["name"] / f"seed-{seed}" / "cell.json"
            if path.is_file():
                cells[(row["name"], seed)] = json.loads(path.read_text())
    eval_names = sorted({n for c in cells.values() for n in c["evals"]})
    header = ["row", "router", "teachers", "seeds"]
    for n in eval_names:
        header += [f"{n} acc %", f"{n} NLL"]
    header += ["train wall s", "step s", "peak RSS MB", "mean weights"]
    table_rows = []
    for row in rows:
        got = [cells[(row["name"], s)] for s in seeds if (row["name"], s) in cells]
        if not got:
            continue
        line = [row["name"], row.get("train", {}).get("router", "fixed"), row.get("teachers", "all"), str(len(got))]
        for n in eval_names:
            acc = _mean_std([100 * c["evals"][n]["accuracy"] for c in got if n in c["evals"]])
            nll = _mean_std([c["evals"][n]["mean_answer_nll"] for c in got if n in c["evals"]])
            line += [f"{acc[0]:.1f} ± {acc[1]:.1f}", f"{nll[0]:.3f} ± {nll[1]:.3f}"]
        wall, step, rss = (_mean_std([c[k] for c in got]) for k in ("train_wall_s", "mean_step_s", "peak_rss_mb"))
        weights = [sum(c["mean_weights"][k] for c in got) / len(got) for k in range(len(got[0]["mean_weights"]))]
        line += [f"{wall[0]:.1f}", f"{step[0]:.2f}", f"{rss[0]:.0f}", "/".join(f"{w:.2f}" for w in weights)]
        table_rows.append(line)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in table_rows]
    table = "\n".join(md)
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + table_rows)
    (out / "results.md").write_text(table + "\n")
    (out / "results.csv").write_text(buf.getvalue())
    loss_png, weights_png = _plot_grid(out, rows, seeds)
    return {"table": table, "csv": str(out / "results.csv"), "loss_png": loss_png, "weights_png": weights_png,
            "cells": list(cells.values())}


def _plot_grid(out: Path, rows: list[dict], seeds: list[int]) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {}
    for row in rows:
        runs = [out / "cells" / row["name"] / f"seed-{s}" for s in seeds]
        got = [read_log(r) for r in runs if (r / "log.jsonl").is_file()]
        if got:
            logs[row["name"]] = got
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, runs in logs.items():
        n = min(len(r) for r in runs)
        ax.plot([runs[0][i]["step"] for i in range(n)], [sum(r[i]["loss"] for r in runs) / len(runs) for i in range(n)], label=name)
    ax.set(xlabel="step", ylabel="training loss (mean over seeds)", title="training loss per row", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    cols = 4
    nrows = max(1, math.ceil(len(logs) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, (name, runs) in zip(axes.flat, logs.items()):
        log = runs[0]
        for k in range(len(log[0]["weights"])):
            ax.plot([e["step"] for e in log], [e["weights"][k] for e in log], label=f"teacher {k}")
        ax.set(title=name, ylim=(-0.03, 1.03), xlabel="step")
        ax.title.set_fontsize(9)
    for ax in list(axes.flat)[len(logs):]:
        ax.axis("off")
    if logs:  # one legend, on a panel with the most teachers
        widest = max(range(len(logs)), key=lambda i: len(list(logs.values())[i][0][0]["weights"]))
        axes.flat[widest].legend(fontsize=7)
    fig.suptitle(f"router weight per teacher (batch mean), seed {seeds[0]}")
    fig.tight_layout()
    fig.savefig(out / "weights.png", dpi=100)
    plt.close(fig)
    return str(out / "loss.png"), str(out / "weights.png")
