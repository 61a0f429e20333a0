"""Shared pieces of the benchmarks: machine description, interleaved timing, JSON/PNG output,
SmolLM2 teacher caches reused between scripts, and one training step as ``kvkd train`` runs it.

Timings on shared machines are noisy, so every benchmark measures its baseline and its
candidates in the same process, alternating them repeat by repeat, and reports medians and
ratios (candidate / baseline). Results go to ``benchmarks/results/NAME.json`` (+ PNG plots).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORK = RESULTS / "work"  # caches reused between runs (git-ignored)
DATA = (REPO / ".." / "shared" / "data" / "gsm8k" / "train.jsonl").resolve()

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def machine() -> dict:
    """What the numbers were measured on (JSON-able)."""
    import numpy
    import transformers
    import zarr

    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m_5m_15m": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
        "numpy": numpy.__version__,
    }


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def interleave(variants: dict[str, Callable[[], float | None]], repeats: int) -> dict[str, list[float]]:
    """Run each variant ``repeats`` times, alternating them (order reversed every other repeat).

    A variant returns its own measured seconds, or None to be timed as a whole.
    Returns: name -> list of seconds.
    """
    out: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            got = variants[name]()
            out[name].append(float(got) if got is not None else time.perf_counter() - t)
            print(f"  [{time.strftime('%H:%M:%S')}] {name} repeat {r + 1}/{repeats}: {out[name][-1]:.3f} s", file=sys.stderr, flush=True)
    return out


def save(name: str, data: dict) -> Path:
    """Write ``benchmarks/results/NAME.json`` (with the machine description) and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **data}, indent=2, default=float))
    return path


def figure(name: str, plot: Callable, ncols: int = 1, folder: Path | None = None) -> Path:
    """Draw ``plot(ax)`` (``plot(axes)`` with ``ncols`` > 1) into ``FOLDER/NAME.png``
    (default folder: ``benchmarks/results``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 3.8), dpi=110, squeeze=False)
    plot(axes[0, 0] if ncols == 1 else list(axes[0]))
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = (folder or RESULTS) / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- teacher caches ------------------------------------------------------------------------------


def smollm2_cache(rows: int, slots: int = 6, codec: str = "float16", compressor: str = "zstd:3", model: str = "smollm2", loaded=None) -> str:
    """A SmolLM2 cache of the first ``rows`` GSM8K train rows, extracted once into ``results/work``."""
    from kvkd.cache.reader import CacheReader
    from kvkd.pipeline.extract import ExtractConfig, extract

    tag = f"{model}-gsm8k{rows}-M{slots}-{codec}-{compressor.replace(':', '')}"
    url = str(WORK / f"{tag}.zarr")
    try:
        CacheReader.open(url)
        return url
    except Exception:  # noqa: BLE001 - missing or incomplete: (re)extract
        pass
    WORK.mkdir(parents=True, exist_ok=True)
    extract(ExtractConfig(model=model, data=str(DATA), limit=rows, out=url, slots=slots, codec=codec, compressor=compressor, overwrite=True), loaded=loaded)
    return url


def teacher_copies(url: str, k: int) -> list[str]:
    """``k`` distinct copies of one cache on disk (K teachers read K stores, as in a real run)."""
    out = []
    for i in range(k):
        dst = Path(f"{url[:-5]}-copy{i}.zarr")
        if not dst.exists():
            shutil.copytree(url, dst)
        out.append(str(dst))
    return out


# ---- one training step, as kvkd train runs it ----------------------------------------------------


class StepBench:
    """The pieces of ``kvkd.train.trainer.train`` needed to time steps (no run folder, no logs).

    Args:
        caches: teacher caches (K >= 0; K = 0 is a CE-only student run).
        cfg: a TrainConfig (student, batch size, router, loader workers ...).
        rows: training rows (the caches' first ``rows`` examples).
    """

    def __init__(self, caches: list[str], cfg, rows: int):
        from kvkd.data import load_examples
        from kvkd.train.trainer import Trainee, build_student, build_trainee, open_teachers
        from kvkd.train.routers import build_router

        torch.manual_seed(cfg.seed)
        self.cfg = replace(cfg, caches=list(caches))
        if caches:
            _, metas = open_teachers(self.cfg)
            self.trainee = build_trainee(self.cfg, metas)
        else:
            student = build_student(cfg.student, cfg.latents or 6, cfg)
            self.trainee = Trainee(student, [], build_router("fixed", 1, student.hidden_size, {}))
        self.examples = load_examples(str(DATA), limit=rows).examples
        self.trainee.train()
        self._start = {k: p.detach().clone() for k, p in self.trainee.named_parameters() if p.requires_grad}
        self.reset()

    def reset(self) -> None:
        """Back to the initial trainable weights with a fresh AdamW, so every timed block starts alike."""
        with torch.no_grad():
            for k, p in self.trainee.named_parameters():
                if k in self._start:
                    p.copy_(self._start[k])
        self.params = [p for p in self.trainee.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=self.cfg.lr)

    def loader(self, batches: list[list[int]], num_workers: int | None = None, dataset=None):
        from torch.utils.data import DataLoader

        from kvkd.train.loader import DistillDataset, collate

        workers = self.cfg.num_workers if num_workers is None else num_workers
        tok = self.trainee.student.tokenizer
        return DataLoader(
            dataset if dataset is not None else DistillDataset(self.examples, tok, self.cfg.caches),
            batch_sampler=batches,
            collate_fn=functools.partial(collate, pad_id=tok.pad_token_id),
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
        )

    def batches(self, steps: int, seed: int = 0) -> list[list[int]]:
        from kvkd.train.trainer import _batches

        return list(_batches(len(self.examples), self.cfg.batch_size, seed, 0, steps))

    def step(self, batch: dict, step: int = 0) -> float:
        """One optimiser step (forward, losses, router, backward, clip, AdamW); returns the loss."""
        from kvkd.train.trainer import distill_step

        if batch["teachers"]:
            loss, _ = distill_step(self.trainee, batch, self.cfg, step)
        else:  # CE-only student
            loss = self.trainee.student(batch["q_ids"], batch["q_mask"], batch["s_ids"], batch["s_mask"], batch["answer_start"]).ce
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        return float(loss.detach())

    def timed_steps(self, batches) -> float:
        """Seconds per step over an iterable of batches, the first step (warm-up) excluded."""
        self.reset()
        it = iter(batches)
        self.step(next(it))
        t, n = time.perf_counter(), 0
        for n, batch in enumerate(it, 1):
            self.step(batch, n)
        return (time.perf_counter() - t) / max(n, 1)
