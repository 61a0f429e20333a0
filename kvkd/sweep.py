"""``kvkd sweep``: run a named experiment grid (rows x seeds), evaluate every run, and write
one comparison table and plots.

Every row trains on the same caches, data, steps and seeds; only the row's overrides of the
training options differ. A row with ``teachers: first`` uses the first cache only (the
single-teacher baseline). Each (row, seed) cell runs in a fresh subprocess, so its wall time
and peak memory (``ru_maxrss``; CUDA peak allocation on a GPU) are its own. A cell's folder is
keyed by its full training options (``seed-S-KEY``), so a rerun with other options (``--steps``,
``--lr``, ...) makes new cells instead of reusing old ones; a cell whose ``cell.json`` holds the
current evaluation key is skipped, a cell killed while training resumes from its run's newest
checkpoint, and a trained cell killed while evaluating resumes at the evaluation. Each cell's
process holds its folder's lock and dies with the sweep.

The built-in grid ``plan`` is the project plan's ablation ladder, each step adding one thing:
(1) no distillation (CE only, the same latent student), (2) single-teacher KV distillation
(KaVa), (3) multi-teacher with fixed uniform weights, (4) similarity router, (5) learnable
router, (6) + attention-weighted KV loss, (7) + CKA, (8) GOVERN and (9) the difficulty router
on top of (7); then CA-MKD, AE-KD, grad-cosine and MTKD-RL, also on top of (7); and (7) +
SIM-CoT's step-level supervision of the latents by each teacher's reasoning steps (``a4``). The grid
``kava-table`` holds the latent rows of KaVa's table: CODI (hidden-state loss only), KaVa with one
teacher, and multi-teacher rows (fixed, similarity, learnable + attention-weighted KV + CKA, GOVERN),
after its text baselines CoT-SFT and No-CoT-SFT.

A row with ``sft: {mode: cot|nocot, ...}`` instead of ``train`` is a text baseline: its cells
fine-tune the sweep's ``--student`` with ``kvkd sft`` (same steps, optimiser, seeds and shared
``--train-option`` values that ``kvkd sft`` has, e.g. ``lora_r``) on the first cache's data-set rows
(its source, split, offset and row count; no teacher cache is read) and are evaluated with
``kvkd eval --mode cot|nocot`` on the exported model (CoT-SFT decodes its reasoning, No-CoT-SFT
answers directly). Its cells are keyed by their full ``kvkd sft`` options, like the latent cells.

Output folder::

    OUT/sweep.json                  resolved options and grid
    OUT/cells/ROW/seed-S-KEY/       the run folder (config, log.jsonl, checkpoints) + train.json + cell.json + evals/DATASET-SPLIT.../
    OUT/results.md, results.csv     mean +- std over seeds per row and eval set (CSV: numeric columns)
    OUT/loss.png, weights.png       training loss per row; router weights per teacher over steps
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

from kvkd.cache.store import StoreArgs, resolve_cache
from kvkd.config import ConfigError, RuntimeArgs, opt, override
from kvkd.train.options import OptimArgs, parse_key_values

from kvkd.eval.overlap import refuse_cache_overlap
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
        {"name": "simcot", "train": {"router": "learnable", **_ON_TOP_OF_7, "a4": 1.0}},
    ],
    # The rows of KaVa's Table (Kuzina et al. 2025): the text baselines CoT-SFT and No-CoT-SFT (kvkd sft,
    # evaluated in their decoding mode), CODI = the hidden-state loss only, KaVa with one teacher, then
    # kvkd's multi-teacher rows.
    "kava-table": [
        {"name": "cot-sft", "sft": {"mode": "cot"}},
        {"name": "nocot-sft", "sft": {"mode": "nocot"}},
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
class SweepConfig(OptimArgs, RuntimeArgs, StoreArgs):
    """Options of ``kvkd sweep`` (besides the optimiser options every row shares and runtime).

    Attributes:
        grid: a built-in grid name (``plan``, ``kava-table``) or a YAML/JSON file: a list of rows
            ``{name, teachers: all|first (default all), train: {TrainConfig overrides}}`` or
            text-baseline rows ``{name, sft: {mode: cot|nocot, SFTConfig overrides}}`` (or a
            mapping with a ``rows`` list).
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
    caches: list[str] = opt(factory=list, cli="cache", help="A teacher cache (path, URL, or a name or key of --cache-root); repeat for several teachers (the first is the single-teacher rows' teacher)")
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
    key: str = ""  # hash of the training options (the folder's suffix)
    eval_key: str = ""  # hash of the evaluation options: another one re-evaluates the trained cell


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
    from kvkd.sft import SFT_MODES, SFTConfig

    known = set(TrainConfig.__dataclass_fields__)
    names = set()
    for r in rows:
        name = r.get("name")
        if not name or name in names:
            raise ValueError(f"grid {grid}: every row needs a unique name (got {name!r})")
        names.add(name)
        if "sft" in r:  # a text baseline (kvkd sft)
            sft_opts = r["sft"]
            if "train" in r or not isinstance(sft_opts, dict) or sft_opts.get("mode") not in SFT_MODES:
                raise ValueError(f"grid {grid}, row {name}: an sft row is {{name, sft: {{mode: cot|nocot, ...}}}} without train options")
            bad = set(sft_opts) - set(SFTConfig.__dataclass_fields__)
            if bad:
                raise ValueError(f"grid {grid}, row {name}: unknown sft options {sorted(bad)}; use SFTConfig's field names (the `kvkd sft` flags with _ for -)")
            continue
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


def _sft_cell_configs(cfg: SweepConfig, row: dict, seed: int, cell_dir: Path):
    """A text-baseline cell: ``kvkd sft`` on the first cache's data-set rows, evaluated in its mode."""
    from kvkd.cache.reader import CacheReader
    from kvkd.eval.evaluate import EvalConfig
    from kvkd.sft import SFTConfig

    ds = CacheReader.open(resolve_cache(cfg.caches[0], cfg.cache_root)).metadata["dataset"]
    known = set(SFTConfig.__dataclass_fields__)
    shared = {f.name: getattr(cfg, f.name) for f in fields(OptimArgs) + fields(RuntimeArgs) if f.name != "seed"}
    opts = dict(model=cfg.student, save_every=max(1, cfg.steps // 4), data=ds["source"], split=ds.get("split"), data_format=ds.get("format", "auto"),
                offset=ds.get("offset", 0), limit=ds.get("selected_rows", ds["rows"]), **shared)
    opts.update({k: v for k, v in cfg.train.items() if k in known})  # the shared options kvkd sft has (lora_r, grad_accum, ...)
    opts.update(row["sft"])
    scfg = SFTConfig(out=str(cell_dir), seed=seed, **opts)
    ecfgs = {
        name: EvalConfig(model=str(cell_dir / "model"), mode=scfg.mode, data=path, split=split, limit=cfg.eval_limit, seed=seed,
                         out=str(cell_dir / "evals" / f"{name}-{scfg.mode}"),  # in the cell folder (a plain model has no run folder)
                         answer_check="math" if "math" in name.lower() else "auto",
                         num_threads=cfg.num_threads, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
        for name, path, split in _eval_sets(cfg)
    }
    return scfg, ecfgs


def _cell_configs(cfg: SweepConfig, row: dict, seed: int, cell_dir: Path):
    """(TrainConfig or SFTConfig, {eval set: EvalConfig}) of one cell."""
    from kvkd.eval.evaluate import EvalConfig
    from kvkd.train.trainer import TrainConfig

    if "sft" in row:
        return _sft_cell_configs(cfg, row, seed, cell_dir)
    caches = cfg.caches[:1] if row.get("teachers", "all") == "first" else list(cfg.caches)
    shared = {f.name: getattr(cfg, f.name) for f in fields(OptimArgs) + fields(RuntimeArgs) if f.name != "seed"}
    opts = dict(student=cfg.student, save_every=max(1, cfg.steps // 4), **shared)
    opts.update(cfg.train)
    opts.update(row.get("train", {}))
    tcfg = TrainConfig(caches=caches, out=str(cell_dir), seed=seed, **opts)
    ecfgs = {
        name: EvalConfig(run=str(cell_dir), mode="latent", data=path, split=split, limit=cfg.eval_limit, seed=seed,
                         answer_check="math" if "math" in name.lower() else "auto",
                         num_threads=cfg.num_threads, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
        for name, path, split in _eval_sets(cfg)
    }
    return tcfg, ecfgs


# options that do not change what a cell computes (where/how fast it runs, its own folder)
_NOT_KEYED = ("out", "run", "num_threads", "device", "num_workers", "prefetch_factor", "log_every", "trust_remote_code", "fresh")


def _key(options: dict) -> str:
    """10 hex digits of the SHA-256 of the options that define a cell (canonical JSON)."""
    kept = {k: v for k, v in sorted(options.items()) if k not in _NOT_KEYED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:10]


def cell_dir(cfg: SweepConfig, row: dict, seed: int) -> Path:
    """``OUT/cells/ROW/seed-S-KEY``: KEY hashes the cell's full training options, so changed options
    (steps, lr, caches, the row's overrides, ...) mean a new cell."""
    from kvkd.sft import SFTConfig, absolute_paths as sft_absolute_paths
    from kvkd.train.trainer import absolute_paths

    tcfg, _ = _cell_configs(cfg, row, seed, Path(cfg.out))
    tcfg = sft_absolute_paths(tcfg) if isinstance(tcfg, SFTConfig) else absolute_paths(tcfg)  # the same cell whatever the working directory
    return Path(cfg.out) / "cells" / row["name"] / f"seed-{seed}-{_key(asdict(tcfg))}"


def _eval_key(ecfgs: dict) -> str:
    return _key({name: _key(asdict(e)) for name, e in ecfgs.items()})


def _arm_parent_death(parent_pid: int) -> None:
    """Die with the sweep even if it is killed outright (Linux PR_SET_PDEATHSIG), and exit at once
    if it already died before the signal was armed (the window right after spawn)."""
    import signal
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(3)


def _run_cell(cfg_json: str, row_json: str, seed: int, cell_dir: str, parent_pid: int | None = None) -> None:
    """Subprocess body: train one cell (or find it trained), measure it, evaluate it, write
    cell.json atomically; the cell folder's lock is held throughout."""
    _arm_parent_death(parent_pid or os.getppid())  # before any work

    import resource

    import torch

    from kvkd.eval.evaluate import evaluate
    from kvkd.sft import sft
    from kvkd.train.rundir import folder_lock, write_atomic
    from kvkd.train.trainer import train

    cfg = SweepConfig(**json.loads(cfg_json))
    from kvkd.threads import resolve_threads

    # this process is the cell's entry point: its global settings are ours to set (0 = the cores
    # free now, which counts the sweep's other running cells)
    torch.set_num_threads(resolve_threads(cfg.num_threads)[0])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    row = json.loads(row_json)
    cell = Path(cell_dir)
    tcfg, ecfgs = _cell_configs(cfg, row, seed, cell)
    with folder_lock(cell, "sweep cell"):
        t = time.perf_counter()
        if "sft" in row:  # a text baseline: no router, no teacher
            summary = sft(tcfg)
            steps = [e["step_s"] for e in read_log(cell)]
            summary.mean_step_s, summary.mean_weights = sum(steps) / len(steps), []
        else:
            summary = train(tcfg)
        measured = cell / "train.json"
        if summary.steps_run or not measured.is_file():  # trained now: this process's figures are the cell's
            write_atomic(measured, json.dumps({
                "train_wall_s": time.perf_counter() - t,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB -> MiB
                "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
                "resumed_from": summary.resumed_from,
            }))
        figures = json.loads(measured.read_text())  # a trained cell resumed at evaluation keeps its training figures
        evals = {}
        for name, ecfg in ecfgs.items():
            if "sft" in row:  # its own --out: an evaluation a kill left behind is redone, as the latent cells' are
                shutil.rmtree(ecfg.out, ignore_errors=True)
            res = evaluate(ecfg)
            res.name = name
            evals[name] = asdict(res)
        result = CellResult(row=row["name"], seed=seed, run_dir=str(cell), train_wall_s=figures["train_wall_s"], mean_step_s=summary.mean_step_s,
                            peak_rss_mb=figures["peak_rss_mb"], peak_cuda_mb=figures["peak_cuda_mb"], final_loss=summary.final_loss,
                            mean_weights=summary.mean_weights, evals=evals, key=cell.name.rsplit("-", 1)[-1], eval_key=_eval_key(ecfgs))
        write_atomic(cell / "cell.json", json.dumps(asdict(result), indent=2))


def _cell_done(cfg: SweepConfig, row: dict, seed: int, cell: Path) -> bool:
    """cell.json exists and was evaluated with the current evaluation options."""
    path = cell / "cell.json"
    if not path.is_file():
        return False
    _, ecfgs = _cell_configs(cfg, row, seed, cell)
    return json.loads(path.read_text()).get("eval_key") == _eval_key(ecfgs)


def check_cells(cfg: SweepConfig, rows: list[dict]) -> None:
    """Before any cell starts: every cell's training options pass ``kvkd train``'s checks, and its
    caches pass the same full compatibility check as ``kvkd train`` (complete, shards match their
    checksums records, rows, fingerprints, M, prompt, key frame, tokenizer), each distinct set of
    caches and rows once.

    Raises:
        ValueError: a bad option, prefixed with the row (``sweep row NAME: ...``).
        kvkd.cache.errors.CacheError / CacheMismatchError / kvkd.data.DataError: as
            :func:`kvkd.train.trainer.open_training_data`, naming the cache.
    """
    from kvkd.sft import check_sft_options
    from kvkd.train.trainer import check_options, open_training_data

    checked = set()
    for row in rows:
        tcfg, _ = _cell_configs(cfg, row, cfg.seeds[0], Path(cfg.out))
        try:
            if "sft" in row:  # a text baseline reads the first cache's rows, which the other rows' check covers
                check_sft_options(tcfg)
                continue
            check_options(tcfg)
        except ValueError as err:
            raise ValueError(f"sweep row {row['name']}: {err}") from None
        key = (tuple(tcfg.caches), tcfg.data, tcfg.split, tcfg.data_format, tcfg.offset, tcfg.limit, tcfg.require_same_tokenizer)
        if key not in checked:
            open_training_data(tcfg)
            checked.add(key)


def run_sweep(cfg: SweepConfig, on_cell: Callable[[str, int, str], None] | None = None) -> dict:
    """Run (or resume) every cell of the grid, then write the table and plots.

    Args:
        on_cell: called as ``on_cell(row, seed, status)`` with status ``start``, ``done`` or
            ``skipped`` (already done).
    Returns:
        dict with ``table`` (Markdown), ``csv``, ``loss_png``, ``weights_png``, ``cells`` (CellResult dicts).
    Raises:
        ValueError: bad grid or options (no caches, no seeds, unknown row names).
        kvkd.data.DataError: an eval set shares rows with the caches' training rows.
        kvkd.cache.errors.CacheError, CacheMismatchError: a cell's caches fail ``kvkd train``'s
            checks (before any cell starts, see :func:`check_cells`).
        RuntimeError: a cell's subprocess failed (names the cell and its folder).
    """
    if not cfg.caches:
        raise ValueError("no teacher cache given: pass --cache PATH (repeat it for several teachers)")
    cfg = replace(cfg, caches=[resolve_cache(c, cfg.cache_root) for c in cfg.caches])  # names/keys of the cache root
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
    refuse_cache_overlap(cfg.caches[0], _eval_sets(cfg))  # eval questions among the training rows: refuse up front
    check_cells(cfg, rows)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = {(row["name"], seed): cell_dir(cfg, row, seed) for row in rows for seed in cfg.seeds}
    from kvkd.train.rundir import write_atomic

    write_atomic(out / "sweep.json", json.dumps({"config": asdict(cfg), "rows": rows,
                                                 "cells": {f"{r}/seed-{s}": str(p.relative_to(out)) for (r, s), p in cells.items()}}, indent=2))
    ctx = multiprocessing.get_context("spawn")
    say = on_cell or (lambda *_: None)
    for row in rows:
        for seed in cfg.seeds:
            cell = cells[(row["name"], seed)]
            if _cell_done(cfg, row, seed, cell):
                say(row["name"], seed, "skipped")
                continue
            say(row["name"], seed, "start")
            cell.mkdir(parents=True, exist_ok=True)
            proc = ctx.Process(target=_run_cell, args=(json.dumps(asdict(cfg)), json.dumps(row), seed, str(cell), os.getpid()))
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
    return write_report(out, rows, cfg.seeds, cells)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def _aggregate(got: list[dict], row: dict, eval_names: list[str]) -> dict:
    """One row of the results: means and standard deviations over the seeds' cells."""
    from kvkd.eval.answers import wilson_interval

    if "sft" in row:  # a text baseline: fine-tuned on the text, no teacher cache
        rec = {"row": row["name"], "router": f"sft-{row['sft']['mode']}", "teachers": "none", "seeds": len(got)}
    else:
        rec = {"row": row["name"], "router": row.get("train", {}).get("router", "fixed"), "teachers": row.get("teachers", "all"), "seeds": len(got)}
    for n in eval_names:
        evals = [c["evals"][n] for c in got if n in c["evals"]]
        acc, nll = _mean_std([e["accuracy"] for e in evals]), _mean_std([e["mean_answer_nll"] for e in evals])
        lo, hi = wilson_interval(sum(e["correct"] for e in evals), sum(e["n"] for e in evals))  # pooled over seeds
        rec.update({f"{n}_acc_mean": acc[0], f"{n}_acc_std": acc[1], f"{n}_n": evals[0]["n"] if len({e["n"] for e in evals}) == 1 else min(e["n"] for e in evals),
                    f"{n}_acc_ci_low": lo, f"{n}_acc_ci_high": hi, f"{n}_nll_mean": nll[0], f"{n}_nll_std": nll[1]})
    for key, name in (("train_wall_s", "train_wall_s"), ("mean_step_s", "step_s"), ("peak_rss_mb", "peak_rss_mb")):
        rec[name] = _mean_std([c[key] for c in got])[0]
    for k in range(len(got[0]["mean_weights"])):
        rec[f"weight_t{k}"] = sum(c["mean_weights"][k] for c in got) / len(got)
    return rec


def write_report(out: Path, rows: list[dict], seeds: list[int], folders: dict[tuple[str, int], Path]) -> dict:
    """Aggregate the cells (``folders``: (row, seed) -> cell folder) into results.md / results.csv /
    loss.png / weights.png.

    ``results.csv`` holds numbers only, one column each (load it with ``csv`` or pandas):
    ``row, router, teachers, seeds``; per eval set ``E``: ``E_acc_mean``, ``E_acc_std``
    (accuracy as a fraction in [0, 1], mean and sample standard deviation over seeds; std 0
    for one seed), ``E_n`` (questions per seed), ``E_acc_ci_low``, ``E_acc_ci_high`` (95%
    Wilson interval of the answers of all seeds pooled), ``E_nll_mean``, ``E_nll_std``
    (gold-answer NLL, nats/token); then ``train_wall_s``, ``step_s``, ``peak_rss_mb`` (means
    over seeds) and ``weight_t0``, ``weight_t1``, ... (mean router weight per teacher; empty
    for rows with fewer teachers), ``missing_seeds`` (the seeds whose cell is missing, space-separated;
    empty when none; a row with no cell at all has only its name, ``seeds`` 0 and this).
    ``results.md`` shows the same as "mean ± std" text, opened by an INCOMPLETE line naming the
    missing cells when there are any, each such row marked MISSING.

    Returns:
        dict with ``table``, ``csv``, ``loss_png``, ``weights_png``, ``cells`` and ``missing``
        (``"ROW seed S"`` per missing cell, for the caller to warn about).
    """
    cells = {}
    for key, folder in folders.items():
        if (folder / "cell.json").is_file():
            cells[key] = json.loads((folder / "cell.json").read_text())
    eval_names = sorted({n for c in cells.values() for n in c["evals"]})
    records = []
    missing = [f"{row['name']} seed {s}" for row in rows for s in seeds if (row["name"], s) not in cells]
    for row in rows:
        got = [cells[(row["name"], s)] for s in seeds if (row["name"], s) in cells]
        absent = " ".join(str(s) for s in seeds if (row["name"], s) not in cells)
        if got:
            records.append({**_aggregate(got, row, eval_names), "missing_seeds": absent})
        else:
            records.append({"row": row["name"], "router": row.get("train", {}).get("router", "fixed"), "teachers": row.get("teachers", "all"),
                            "seeds": 0, "missing_seeds": absent})
    header = ["row", "router", "teachers", "seeds"]
    for n in eval_names:
        header += [f"{n} acc %", f"{n} NLL"]
    header += ["train wall s", "step s", "peak RSS MB", "mean weights"]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        seeds_text = f"{r['seeds']} (MISSING seed {r['missing_seeds']})" if r["missing_seeds"] else str(r["seeds"])
        line = [r["row"], r["router"], r["teachers"], seeds_text]
        if not r["seeds"]:
            md.append("| " + " | ".join(line + ["MISSING"] * (len(header) - len(line))) + " |")
            continue
        for n in eval_names:
            line += [f"{100 * r[f'{n}_acc_mean']:.1f} ± {100 * r[f'{n}_acc_std']:.1f}", f"{r[f'{n}_nll_mean']:.3f} ± {r[f'{n}_nll_std']:.3f}"]
        weights = [r[k] for k in r if k.startswith("weight_t")]
        line += [f"{r['train_wall_s']:.1f}", f"{r['step_s']:.2f}", f"{r['peak_rss_mb']:.0f}", "/".join(f"{w:.2f}" for w in weights)]
        md.append("| " + " | ".join(line) + " |")
    if missing:
        md.insert(0, f"**INCOMPLETE: {len(missing)} of {len(rows) * len(seeds)} cells missing ({', '.join(missing)}); "
                     "their rows average fewer seeds.**\n")
    table = "\n".join(md)
    columns = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(records)
    (out / "results.md").write_text(table + "\n")
    (out / "results.csv").write_text(buf.getvalue())
    loss_png, weights_png = _plot_grid(out, rows, seeds, folders)
    return {"table": table, "csv": str(out / "results.csv"), "loss_png": loss_png, "weights_png": weights_png,
            "cells": list(cells.values()), "missing": missing}


def _plot_grid(out: Path, rows: list[dict], seeds: list[int], folders: dict[tuple[str, int], Path]) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {}
    for row in rows:
        runs = [folders[(row["name"], s)] for s in seeds if (row["name"], s) in folders]
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
    logs = {name: runs for name, runs in logs.items() if "weights" in runs[0][0]}  # text baselines (kvkd sft) have no router
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
