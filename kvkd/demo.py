"""``kvkd demo``: the main job end to end on its embedded default.

Two teachers (SmolLM2-135M-Instruct reading GSM8K's natural-language CoT, and the same
model reading the equation-only CoT, falling back to the NL CoT on rows without equations) are extracted over a GSM8K training subset; a SmolLM2
student with LoRA trains against both caches with a router; the trained student, the
untrained latent student and the plain model answering without CoT are evaluated on a
GSM8K test subset; a report folder gets the table (Markdown + JSON) and a training plot.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from kvkd.eval.evaluate import EvalConfig, EvalResult, evaluate, new_folder
from kvkd.eval.report import plot_run, results_table
from kvkd.models import load_model
from kvkd.config import RuntimeArgs, opt, override
from kvkd.pipeline.extract import ExtractConfig, extract
from kvkd.train.options import OptimArgs, _router_names
from kvkd.train.trainer import TrainConfig, train

SAMPLES = Path(__file__).parent / "samples"


@dataclass
class DemoConfig(OptimArgs, RuntimeArgs):
    """Options of ``kvkd demo`` (sizes chosen to finish in about ten minutes on 2 CPU cores).

    Attributes (besides the optimiser and runtime groups):
        out: output folder (caches, run, report).
        model: teacher and student spec.
        data_dir: a GSM8K folder with train.jsonl/test.jsonl ("" = the packaged 64/40-row sample).
        train_rows / test_rows: rows used (at most the sample's 64 / 40 without data_dir).
        slots: M (cache slots and latent thoughts).
        router: router name; extract_batch_size: teacher batch size.
    """

    steps: int = override(OptimArgs, "steps", 48, "sized to finish in minutes on 2 CPU cores")
    batch_size: int = override(OptimArgs, "batch_size", 4, "CPU-sized")
    lr: float = override(OptimArgs, "lr", 5e-4, "higher for the short CPU run")
    warmup_steps: int = override(OptimArgs, "warmup_steps", 0, "0 = a tenth of --steps", default_text="a tenth of --steps")
    out: str = opt("demo_out", help="Output folder (caches, run, report)")
    model: str = opt("smollm2", help="Teacher and student model")
    data_dir: str = opt("", help="GSM8K folder with train.jsonl/test.jsonl", default_text="the packaged 64/40-row sample")
    train_rows: int = opt(64, help="Training rows extracted and trained on")
    test_rows: int = opt(40, help="Test rows evaluated")
    slots: int = opt(6, help="M slots / latent thoughts")
    router: str = opt("similarity", help="Router", choices=_router_names)
    extract_batch_size: int = opt(8, help="Examples per teacher forward")


@dataclass
class DemoResult:
    out: str
    wall_s: float
    stage_s: dict
    extract: list
    train: dict
    evals: list[EvalResult]
    table: str
    report_dir: str


def run_demo(cfg: DemoConfig, on_stage: Callable[[str], None] | None = None, progress: dict | None = None) -> DemoResult:
    """Run extract x2 -> train -> eval x3 -> report. ``progress`` may hold per-stage callbacks
    (``extract``, ``train``, ``eval``) forwarded to the library functions."""
    progress = progress or {}
    say = on_stage or (lambda _msg: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.data_dir:
        train_data, test_data = str(Path(cfg.data_dir) / "train.jsonl"), str(Path(cfg.data_dir) / "test.jsonl")
    else:
        train_data, test_data = str(SAMPLES / "gsm8k_train_sample.jsonl"), str(SAMPLES / "gsm8k_test_sample.jsonl")
    t0 = time.perf_counter()
    stages: dict[str, float] = {}

    say(f"loading teacher {cfg.model}")
    t = time.perf_counter()
    teacher = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    stages["load"] = time.perf_counter() - t
    summaries, caches = [], []
    for trace in ("nl", "equations"):
        path = out / "caches" / f"teacher-{trace}.zarr"
        say(f"extracting teacher reading the {trace} CoT -> {path}")
        t = time.perf_counter()
        ecfg = ExtractConfig(
            model=cfg.model, data=train_data, out=str(path), limit=cfg.train_rows, trace=trace,
            trace_fallback="nl" if trace == "equations" else None,
            slots=cfg.slots, batch_size=cfg.extract_batch_size, num_threads=cfg.num_threads, device=cfg.device,
        )
        summaries.append(asdict(extract(ecfg, loaded=teacher, on_progress=progress.get("extract"))))
        stages[f"extract_{trace}"] = time.perf_counter() - t
        caches.append(str(path))
    del teacher

    run_dir = out / "run"
    say(f"training the latent student with the {cfg.router} router -> {run_dir}")
    t = time.perf_counter()
    tcfg = TrainConfig(
        caches=caches, out=str(run_dir), student=cfg.model, steps=cfg.steps, batch_size=cfg.batch_size,
        lr=cfg.lr, warmup_steps=cfg.warmup_steps or max(1, cfg.steps // 10), router=cfg.router, seed=cfg.seed,
        weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, num_threads=cfg.num_threads, device=cfg.device,
        trust_remote_code=cfg.trust_remote_code, save_every=0,
    )
    tsum = train(tcfg, on_step=progress.get("train"))
    stages["train"] = time.perf_counter() - t

    evals = []
    common = dict(data=test_data, limit=cfg.test_rows, num_threads=cfg.num_threads, device=cfg.device, trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
    for name, ecfg in (
        ("no-CoT (plain model)", EvalConfig(model=cfg.model, mode="nocot", out=str(new_folder(out / "eval", "nocot")), **common)),
        ("latent, untrained", EvalConfig(model=cfg.model, mode="latent", untrained=True, latents=cfg.slots, out=str(new_folder(out / "eval", "untrained")), **common)),
        (f"latent, KaVa x2 teachers ({cfg.router})", EvalConfig(run=str(run_dir), mode="latent", out=str(new_folder(out / "eval", "trained")), **common)),
    ):
        say(f"evaluating {name}")
        t = time.perf_counter()
        res = evaluate(ecfg, on_progress=progress.get("eval"))
        res.name = name
        evals.append(res)
        stages[f"eval_{name}"] = time.perf_counter() - t

    report = out / "report"
    report.mkdir(exist_ok=True)
    table = results_table(evals)
    (report / "results.md").write_text(table + "\n")
    (report / "results.json").write_text(json.dumps([asdict(e) for e in evals], indent=2))
    plot_run(run_dir, report / "training.png")
    wall = time.perf_counter() - t0
    (report / "demo.json").write_text(json.dumps({"wall_s": wall, "stage_s": stages, "extract": summaries, "train": asdict(tsum), "config": asdict(cfg)}, indent=2))
    return DemoResult(str(out), wall, stages, summaries, asdict(tsum), evals, table, str(report))
