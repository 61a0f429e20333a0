"""The ``kvkd`` command line (Typer), a thin skin generated from the config dataclasses:
every option of ``kvkd extract|train|eval|sweep|demo`` is a field declared once with
:func:`kvkd.config.opt` (default, help, CLI name); :func:`config_command` turns those fields
into Typer options, resolves defaults <- ``--config FILE`` <- flags, and calls one library
function. The CLI alone sets process-global state (torch threads, environment) and prints.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from kvkd.config import ConfigError, choices_of, cli_options, resolve
from kvkd.demo import DemoConfig
from kvkd.eval.evaluate import EvalConfig
from kvkd.generate import GenerateConfig
from kvkd.sft import SFTConfig
from kvkd.pipeline.extract import ExtractConfig
from kvkd.sweep import SweepConfig
from kvkd.train.export import ExportConfig
from kvkd.train.options import TrainConfig

app = typer.Typer(help="kvkd: multi-teacher KV-cache distillation of LLM reasoning (KaVa/CODI).", no_args_is_help=True, add_completion=False, rich_markup_mode=None)
cache_app = typer.Typer(help="Inspect and verify teacher caches.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(cache_app, name="cache")


def _version(value: bool) -> None:
    if value:
        from kvkd.eval.evaluate import versions

        v = versions()
        console.print(f"kvkd {v['kvkd']} (torch {v['torch']}, transformers {v['transformers']})", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the versions of kvkd, torch and transformers, then exit.")):
    """kvkd: multi-teacher KV-cache distillation of LLM reasoning (KaVa/CODI)."""
# In a log file (SLURM, nohup) rich would wrap tables at 80 columns: give it room instead.
console = Console() if sys.stdout.isatty() else Console(width=int(os.environ.get("COLUMNS", "200")))

CONFIG_HELP = "YAML/TOML/JSON file of options (flat, a section per command, groups as sub-sections); flags override it."
ERRORS = (ValueError, KeyError, TypeError, ConfigError, FileNotFoundError, FileExistsError, RuntimeError, PermissionError)


def _rank() -> int:
    """This process's global rank under torchrun/deepspeed (RANK), 0 otherwise."""
    return int(os.environ.get("RANK", "0"))


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """Within the block a SIGTERM (a scheduler's stop) raises KeyboardInterrupt like Ctrl-C, so
    extract/train/sft stop the same way for both (claims and locks released, one line); the
    previous handler is restored after."""
    previous = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(err: Exception) -> None:
    msg = err.args[0] if isinstance(err, KeyError) and err.args else err
    console.print(f"[bold red]error:[/] {escape(str(msg))}", markup=True, highlight=False, soft_wrap=True)  # one line, never wrapped
    raise typer.Exit(code=2)


_METAVARS = {str: "TEXT", int: "INT", float: "FLOAT"}


def _metavar(spec) -> str | None:
    tp = spec.cli_type
    if getattr(tp, "__origin__", None) is list:
        return f"{_METAVARS.get(tp.__args__[0], 'TEXT')} (repeatable)"
    choices = choices_of(spec)
    if choices:
        return "|".join(str(c) for c in choices if c is not None)
    return _METAVARS.get(tp)


def _typer_type(spec) -> Any:
    tp = spec.cli_type
    if getattr(tp, "__origin__", None) is list:
        return Optional[List[tp.__args__[0]]]
    return Optional[tp]


def config_command(target, cls, section: str, *, name: str | None = None, extra: list[inspect.Parameter] = ()):
    """Register ``fn(cfg_or_flags, config_path, **extra)`` as command ``name`` with one Typer
    option per field of ``cls`` (from :func:`kvkd.config.cli_options`), plus ``extra``
    parameters and ``--config``.

    The wrapped function receives the flags given on the command line, parsed into field
    values (``{field: value}``, options not given left out), and the ``--config`` path.
    """

    def deco(fn: Callable):
        specs = cli_options(cls)
        params = [
            inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, annotation=_typer_type(s),
                              default=typer.Option(None, *s.flags, help=s.help, hidden=s.hidden, metavar=_metavar(s)))
            for s in specs
        ]
        params += list(extra)
        params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(None, help=CONFIG_HELP)))
        extra_names = [p.name for p in extra]

        def command(**kwargs):
            config = kwargs.pop("config")
            extras = {k: kwargs.pop(k) for k in extra_names}
            flags = {}
            try:
                for s in specs:
                    v = kwargs[s.name]
                    if v is None or (isinstance(v, (list, tuple)) and not v):
                        continue
                    flags[s.name] = s.parse(list(v) if isinstance(v, tuple) else v) if s.parse else (list(v) if isinstance(v, tuple) else v)
            except ERRORS as err:
                _fail(err)
            return fn(flags, config, **extras)

        command.__signature__ = inspect.Signature(params)
        command.__doc__ = fn.__doc__
        command.__name__ = fn.__name__
        target.command(name or section)(command)
        return fn

    return deco


def _resolve(cls, section: str, config: str | None, flags: dict):
    """Resolve a config and apply its process-global settings (threads) here, in the CLI."""
    cfg = resolve(cls, section, config, flags)
    if hasattr(cfg, "num_threads"):
        import torch

        from kvkd.threads import resolve_threads

        global _THREADS_NOTE
        threads, why = resolve_threads(cfg.num_threads)
        torch.set_num_threads(threads)
        if not cfg.num_threads and threads < (os.cpu_count() or 1):  # auto chose fewer than torch would: said when work starts
            _THREADS_NOTE = f"torch threads: {why}"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not console.is_terminal:  # a log file gets kvkd's progress lines, not transformers' tqdm bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return cfg


class PlainProgress:
    """Progress as plain lines for a log file or a SLURM job (no terminal): a line at the first
    update, then one every ``every_s`` seconds (``KVKD_PROGRESS_EVERY_S``, default 30) and one at
    the end, each with the time, done/total, rate (loss, tokens/s, s/step) and ETA; the same calls
    as rich's Progress."""

    def __init__(self, out: Console, every_s: float = 30.0):
        self.console, self.every_s = out, every_s
        self.tasks: dict[int, dict] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for t in self.tasks.values():
            if t["completed"] and t["printed"] != t["completed"]:
                self._line(t)
        return False

    def add_task(self, description: str, total=None, **fields):
        tid = len(self.tasks)
        self.tasks[tid] = {"description": description, "total": total, "completed": 0, "fields": fields, "start": time.perf_counter(), "last": 0.0, "printed": None}
        return tid

    def reset(self, tid, description=None, **_):
        t = self.tasks[tid]
        t.update(completed=0, start=time.perf_counter(), last=0.0, printed=None)
        if description:
            t["description"] = description

    def update(self, tid, completed=None, total=None, **fields):
        t = self.tasks[tid]
        if total is not None:
            t["total"] = total
        if completed is not None:
            t["completed"] = completed
        t["fields"].update(fields)
        now = time.perf_counter()
        done = t["total"] is not None and t["completed"] >= t["total"]
        first = t["printed"] is None and t["completed"]
        if first or now - t["last"] >= self.every_s or (done and t["printed"] != t["completed"]):
            t["last"] = now
            self._line(t)

    def _line(self, t):
        elapsed = time.perf_counter() - t["start"]
        n, total = t["completed"], t["total"]
        eta = f" ETA {((total - n) * elapsed / n):.0f} s" if n and total else ""
        rate = t["fields"].get("rate", "")
        self.console.print(f"{time.strftime('%H:%M:%S')} {t['description']} {n}/{total if total is not None else '?'} {rate} elapsed {elapsed:.0f} s{eta}", markup=False, highlight=False)
        t["printed"] = n


_THREADS_NOTE = ""  # set by _resolve when --threads 0 chose fewer threads than cores; printed at the first progress update


def _progress(unit: str):
    """A live bar in a terminal; plain progress lines otherwise (log files, SLURM jobs). The first
    one of a command first says how many torch threads ``--threads 0`` chose, if fewer than the
    cores (at its first update, once the work has started, so that an option error stays one line)."""
    global _THREADS_NOTE
    if not console.is_terminal:
        prog = PlainProgress(console, float(os.environ.get("KVKD_PROGRESS_EVERY_S", "30")))
    else:
        prog = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
        )
    note, _THREADS_NOTE = _THREADS_NOTE, ""
    if note:  # said at the first progress update: work has started, every option check has passed
        update = prog.update

        def first_update(*args, **kwargs):
            nonlocal note
            if note:
                prog.console.print(note, markup=False, highlight=False, style="dim")
                note = ""
            return update(*args, **kwargs)

        prog.update = first_update
    return prog


def _codec_names(codecs) -> str:
    """Compact codec chain, e.g. ``sharding_indexed[bytes>zstd(3)]``."""
    names = []
    for c in codecs or []:
        if not isinstance(c, dict):
            names.append(str(c))
            continue
        conf = c.get("configuration") or {}
        if c.get("name") == "sharding_indexed":
            names.append(f"shard[{_codec_names(conf.get('codecs'))}]")
        elif "level" in conf:
            names.append(f"{c['name']}({conf['level']}{',' + str(conf['shuffle']) if 'shuffle' in conf else ''})")
        else:
            names.append(str(c.get("name")))
    return ">".join(names)


def _print_summary(title: str, data: dict) -> None:
    table = Table(title=title, show_header=False)
    table.add_column()
    table.add_column(overflow="fold")
    for k, v in data.items():
        if isinstance(v, float):
            v = f"{v:,.3f}"
        elif isinstance(v, (list, dict)):
            v = json.dumps(v)
        table.add_row(k, str(v))
    console.print(table)


def _extra(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


# ----------------------------------------------------------------------------- extract
@config_command(app, ExtractConfig, "extract", extra=[
    _extra("dry_run", bool, typer.Option(False, "--dry-run", help="Read only the teacher's config and tokenizer and the data; print shapes, tokens and the cache size; write nothing.")),
    _extra("student", Optional[str], typer.Option(None, help="With --dry-run: also show the layer map and projections against this student (config only).")),
    _extra("layer_map", Optional[str], typer.Option(None, help="With --dry-run and --student: proportional, last, or teacher layers per student layer (0,2,4,5) [default: proportional].")),
])
def extract(flags: dict, config: Optional[str], dry_run: bool, student: Optional[str], layer_map: Optional[str]):
    """Run one teacher over a data set and write its compressed KV cache (resumable).

    Several jobs (`--num-shards N --shard-index i`) or ranks (`torchrun --nproc_per_node N -m kvkd.cli extract ...`)
    may write one cache at once; the last to finish marks it complete.
    """
    from kvkd.pipeline.extract import extract as run_extract

    from kvkd.pipeline.extract import ExtractInterrupted

    if dry_run:
        _extract_plan(flags, config, student, layer_map)
        return
    try:
        cfg = _resolve(ExtractConfig, "extract", config, flags)
        with _sigterm_as_ctrl_c(), _progress("examples") as prog:
            task = prog.add_task("extract", total=None, rate="")

            def on_progress(p):
                prog.update(task, total=p.total, completed=p.done, rate=f"{p.tokens / max(p.elapsed_s, 1e-9):,.0f} tokens/s")

            summary = run_extract(cfg, on_progress=on_progress)
    except ExtractInterrupted as err:
        where = f"at shard {err.shard}" if err.shard is not None else "before the first shard"
        console.print(f"interrupted {where} of {err.out}; rerun the same command to resume", markup=False, highlight=False)
        raise typer.Exit(code=130) from None
    except KeyboardInterrupt:
        console.print("interrupted before the cache was opened; nothing was written", markup=False, highlight=False)
        raise typer.Exit(code=130) from None
    except ERRORS as err:
        _fail(err)
    if summary.reused is not None:
        r = summary.reused
        console.print(f"reused cache {summary.key} ({summary.name}) made by {r['made_by']} at {r['made_at']} with kvkd {r['kvkd_version']}", markup=False, highlight=False)
        console.print(f"cache: {summary.path}", markup=False, highlight=False)
        return
    for p in summary.problems:
        console.print(f"[yellow]skipped row {p['row']}: {escape(str(p['reason']))}[/]")
    if summary.too_long:
        console.print(f"[yellow]warning: {len(summary.too_long)} row(s) longer than the teacher's context were left out "
                      f"(--too-long skip; listed in the cache metadata as dataset.too_long_ids), e.g. {escape(str(summary.too_long[0]))}[/]")
    _print_summary("extraction", asdict(summary))


def _extract_plan(flags: dict, config: Optional[str], student: Optional[str], layer_map: Optional[str]) -> None:
    """``kvkd extract --dry-run``: print the plan of an extraction."""
    from kvkd.models import ModelLoadError
    from kvkd.plan import plan_extraction
    from kvkd.train.align import parse_layer_map

    try:
        cfg = _resolve(ExtractConfig, "extract", config, flags)
        plan = plan_extraction(cfg, student=student, layer_map_spec=parse_layer_map(layer_map) if layer_map else "proportional")
    except (*ERRORS, ModelLoadError) as err:
        _fail(err)
    info = plan.teacher_info
    _print_summary(f"extraction plan: {plan.teacher} (nothing run, nothing written)", {
        "teacher": f"{info.get('architecture')} ({info.get('model_type')})",
        "layers / heads / KV heads / head dim / hidden": f"{info['num_layers']} / {info['num_heads']} / {info['num_kv_heads']} / {info['head_dim']} / {info['hidden_size']}",
        "tokenizer": f"{plan.tokenizer['source']}  vocab {plan.tokenizer['vocab_size']}  hash {plan.tokenizer['hash'][:12]}",
        "rows": plan.rows,
        "teacher tokens (total / longest row)": f"{plan.teacher_tokens:,} / {plan.max_tokens:,}",
        "slots M / codec": f"{plan.slots} / {plan.codec}",
        "bytes per example (uncompressed)": f"{plan.bytes_per_example:,}",
        "total cache size (uncompressed)": f"{plan.total_bytes:,} bytes ({plan.total_bytes / 2**20:,.1f} MiB)",
        "shards (examples per shard)": f"{plan.num_shards} ({plan.examples_per_shard})",
        "rows reading the fallback trace": len(plan.trace_fallback_rows),
    })
    table = Table("array", "per-example shape", "stored dtype")
    for name, (shape, dtype) in plan.arrays.items():
        table.add_row(name, str(tuple(shape)), dtype)
    console.print(table)
    if plan.student:
        s = plan.student
        sh = s["shape"]
        _print_summary(f"against student {s['spec']}", {
            "student layers / KV heads / head dim / hidden": f"{sh['num_layers']} / {sh['num_kv_heads']} / {sh['head_dim']} / {sh['hidden_size']}",
            "layer map (teacher layer per student layer)": s["layer_map"],
            "KV projection": s["kv_projection"],
            "hidden projection": s["hidden_projection"],
            "same tokenizer as the student": "yes" if s["tokenizer_shared"] else "no (fine in latent mode)",
        })


def _print_teachers(run_dir: str) -> None:
    """Per-teacher table of a run: shape, layer map, projections, tokenizer shared with the student."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return
    teachers = json.loads(Path(path).read_text()).get("teachers", [])
    table = Table(title="teachers")
    for name in ("teacher cache", "L/H_kv/D/d", "layer map", "KV / hidden", "tokenizer vs the student's"):
        table.add_column(name, overflow="fold")
    for t in teachers:
        sh, al = t.get("shape", {}), t.get("alignment", {})
        shared = "shared" if t.get("tokenizer_shared_with_student") else "differs: " + "; ".join(t.get("tokenizer_differences", [])[:2])
        table.add_row(str(t.get("cache")), f"{sh.get('num_layers')}/{sh.get('num_kv_heads')}/{sh.get('head_dim')}/{sh.get('hidden_size')}",
                      str(al.get("layer_map")), f"{al.get('kv', '?').split(' ')[0]} / {al.get('hidden', '?').split(' ')[0]}", shared)
    console.print(table)


# ----------------------------------------------------------------------------- generate
@config_command(app, GenerateConfig, "generate")
def generate(flags: dict, config: Optional[str]):
    """Let a teacher solve the questions itself (hf or vLLM) and write its traces to a JSONL trace file (resumable);
    prints its solve rate with a 95% interval and what --keep/--fallback select for `kvkd extract --trace FILE`."""
    from kvkd.generate import generate_traces

    try:
        cfg = _resolve(GenerateConfig, "generate", config, flags)
        with _progress("questions") as prog:
            task = prog.add_task("generate", total=None, rate="")
            summary = generate_traces(cfg, on_progress=lambda p: prog.update(task, total=p.total, completed=p.done, rate=f"{p.tokens / max(p.elapsed_s, 1e-9):,.0f} tokens/s"))
    except ERRORS as err:
        _fail(err)
    _print_summary("generation", {**asdict(summary), "solve rate (95% CI)": f"{summary.accuracy:.1%} [{summary.ci_low:.1%}, {summary.ci_high:.1%}] of {summary.traces} traces"})


def _interrupted_run(out: str | None) -> None:
    """Ctrl-C or SIGTERM during ``train``/``sft``: one line saying where the run stopped and what a rerun resumes from; exit 130."""
    from kvkd.train.rundir import RunDir

    if not out:
        console.print("interrupted before training started; nothing was written", markup=False, highlight=False)
        raise typer.Exit(code=130)
    rundir = RunDir(out)
    try:
        log = rundir.read_log() if rundir.log_path.is_file() else []
        ckpt = rundir.latest_checkpoint() if rundir.path.is_dir() else None
        saved = RunDir.checkpoint_step(ckpt) if ckpt is not None else 0
    except (OSError, ValueError, KeyError):  # a checkpoint torn by the interrupt itself: the rerun removes it
        log, saved = [], 0
    at = f"at step {log[-1]['step']}" if log else "before the first step"
    resume = f"it resumes from the checkpoint of step {saved}" if saved else "no checkpoint was written yet, so it starts from step 0"
    console.print(f"interrupted {at} of {out}; rerun the same command: {resume}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code=130)


# ----------------------------------------------------------------------------- train
# the deepspeed launcher passes --local_rank to every rank's process (train and sft)
LOCAL_RANK = _extra("local_rank", Optional[int], typer.Option(None, "--local_rank", "--local-rank", hidden=True, help="Set by the deepspeed launcher; the rank is read from LOCAL_RANK."))


@config_command(app, TrainConfig, "train", extra=[LOCAL_RANK])
def train(flags: dict, config: Optional[str], local_rank: Optional[int]):
    """Train a latent (CODI/KaVa) student against teacher caches with a router; no teacher is loaded.

    With --deepspeed, run one process per rank: `torchrun --nproc_per_node N -m kvkd.cli train --deepspeed ds.json ...`
    or `deepspeed --module kvkd.cli train --deepspeed ds.json ...`; rank 0 prints and writes the run folder.
    """
    from kvkd.train.trainer import repeated_caches
    from kvkd.train.trainer import train as run_train

    cfg = None
    try:
        cfg = _resolve(TrainConfig, "train", config, flags)
        if _rank() != 0:  # other ranks train silently; rank 0 shows progress and the summary
            run_train(cfg)
            return
        for loc, ks in repeated_caches(cfg.caches).items():
            console.print(f"note: the cache {loc} is given {len(ks)} times (teachers {', '.join(map(str, ks))}): it counts as {len(ks)} teachers "
                          "(that share of fixed weights, that many votes in govern/grad-cosine); give each cache once unless that is meant",
                          markup=False, highlight=False, soft_wrap=True)
        with _sigterm_as_ctrl_c(), _progress("steps") as prog:
            task = prog.add_task("train", total=cfg.steps, rate="")

            def on_step(e):
                w = " ".join(f"{x:.2f}" for x in e.weights)
                prog.update(task, completed=e.step, rate=f"loss {e.loss:.3f} ce {e.ce:.3f} w [{w}] {e.step_s:.2f} s/step")

            summary = run_train(cfg, on_step=on_step)
    except KeyboardInterrupt:
        _interrupted_run(getattr(cfg, "out", None))
    except ERRORS as err:
        _fail(err)
    if summary.steps_run == 0:
        console.print(f"{summary.run_dir} is already trained to step {summary.steps}: nothing to do (give a larger --steps to train on, or --fresh to start over)")
    _print_teachers(summary.run_dir)
    _print_summary("training", asdict(summary))


# ----------------------------------------------------------------------------- sft
@config_command(app, SFTConfig, "sft", extra=[LOCAL_RANK])
def sft_cmd(flags: dict, config: Optional[str], local_rank: Optional[int]):
    """Fine-tune a teacher or baseline on (question, trace, answer) text: --mode cot (CoT-SFT) or nocot (No-CoT-SFT),
    loss on the target tokens only; exports OUT/model, a Hugging Face folder for --model of generate/extract/eval.

    A rerun of the same command resumes from the newest checkpoint (--fresh starts over). With --deepspeed (ZeRO-1/2),
    run one process per rank: `torchrun --nproc_per_node N -m kvkd.cli sft --deepspeed ds.json ...`; rank 0 prints.
    """
    from kvkd.sft import sft

    cfg = None
    try:
        cfg = _resolve(SFTConfig, "sft", config, flags)
        if _rank() != 0:
            sft(cfg)
            return
        with _sigterm_as_ctrl_c(), _progress("steps") as prog:
            task = prog.add_task("sft", total=cfg.steps, rate="")
            summary = sft(cfg, on_step=lambda e: prog.update(task, completed=e.step, rate=f"loss {e.loss:.3f} {e.step_s:.2f} s/step"))
    except KeyboardInterrupt:
        _interrupted_run(getattr(cfg, "out", None))
    except ERRORS as err:
        _fail(err)
    if summary.steps_run == 0:
        console.print(f"{summary.run_dir} is already trained to step {summary.steps}: nothing to do (give a larger --steps to train on, or --fresh to start over)")
    _print_summary("sft", asdict(summary))


# ----------------------------------------------------------------------------- eval
@config_command(app, EvalConfig, "eval")
def eval_cmd(flags: dict, config: Optional[str]):
    """Evaluate a trained run (latent decoding) or a plain model; accuracy with 95% CI and gold-answer NLL.

    Writes metrics.json and predictions.jsonl into a new folder per evaluation (RUN/evals/DATASET-SPLIT...).
    """
    from kvkd.eval.evaluate import evaluate
    from kvkd.eval.report import results_table

    def warn(message: str) -> None:
        console.print(f"[bold yellow]warning:[/] {message}", markup=True, highlight=False)

    try:
        cfg = _resolve(EvalConfig, "eval", config, flags)
        if not cfg.data:
            raise ConfigError("no evaluation data: pass --data")
        with _progress("examples") as prog:
            task = prog.add_task("eval", total=None, rate="")
            result = evaluate(cfg, on_progress=lambda d, n: prog.update(task, completed=d, total=n), on_warning=warn)
    except ERRORS as err:
        _fail(err)
    console.print(results_table([result]))
    kinds = ", ".join(f"{k} {v}" for k, v in result.gold_kinds.items())
    console.print(f"answer check: {result.answer_check} (gold answers: {kinds}); no answer found in {result.no_answer} outputs"
                  + (f"; {result.unparsed} compared as strings (math-verify could not read them)" if result.answer_check == "math" else ""))
    console.print(f"metrics: {result.metrics}\npredictions: {result.predictions}")


# ----------------------------------------------------------------------------- export
@config_command(app, ExportConfig, "export")
def export(flags: dict, config: Optional[str]):
    """Export a trained student as a normal Hugging Face folder (transformers loads it) plus its latent head
    (CODI projection, <bot>/<eot> vectors, M) that `kvkd eval --run FOLDER` uses, and a README.md model card;
    aligners and router are left out. A checkpoint with NaN/inf weights is refused."""
    from kvkd.train.export import export_run

    try:
        cfg = _resolve(ExportConfig, "export", config, flags)
        if not cfg.run or not cfg.out:
            raise ConfigError("pass --run RUN_DIR and --out FOLDER")
        path = export_run(cfg.run, cfg.out, overwrite=cfg.overwrite, trust_remote_code=cfg.trust_remote_code)
    except ERRORS as err:
        _fail(err)
    console.print(f"exported {cfg.run} -> {path}")


# ----------------------------------------------------------------------------- cache
def _cache_root_option():
    """``--cache-root`` of the ``kvkd cache`` commands, with the help of its one declaration (``StoreArgs``)."""
    from kvkd.cache.store import StoreArgs

    spec = cli_options(StoreArgs)[0]
    return typer.Option(None, *spec.flags, help=spec.help)


@cache_app.command("info")
def cache_info(path: str = typer.Argument(..., help="Cache: a name or key of --cache-root, or a path/URL."), as_json: bool = typer.Option(False, "--json", help="Print JSON."),
               cache_root: Optional[str] = _cache_root_option()):
    """Print a cache's metadata, array shapes, dtypes, codecs and sizes."""
    from kvkd.cache.reader import CacheReader
    from kvkd.cache.store import locate

    try:
        info = CacheReader.open(locate(path, cache_root or "")[0], allow_incomplete=True, local_root=None).info()
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    meta = info.get("metadata", {})
    tok = meta.get("tokenizer", {})
    prov = meta.get("provenance") or {}
    teacher = meta.get("teacher") or {}
    _print_summary(f"cache {path}", {
        "tokenizer vocab_size": f"{tok.get('vocab_size')} (len(tokenizer): every id it emits, added tokens included; not the embedding size)",
        "tokenizer hash": f"{tok.get('hash')} (vocabulary, merges, special tokens, pre-tokenisation)",
        "teacher weights hash": teacher.get("file_sha256") or teacher.get("weights_sha256") or "not recorded",
        "checksums": info.get("checksums"),
        "library versions": ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items()) or "not recorded (cache from an older kvkd)",
        "device": (prov.get("device") or {}).get("name", "not recorded"),
        **{k: v for k, v in meta.items() if k != "provenance"},
    })
    table = Table("array", "shape", "dtype", "chunks", "shards", "codecs", "stored bytes")
    for name, a in info.get("arrays", {}).items():
        table.add_row(name, str(a.get("shape")), str(a.get("dtype")), str(a.get("chunks")), str(a.get("shards")), _codec_names(a.get("codecs")), f"{a.get('stored_bytes', 0):,}")
    console.print(table)
    console.print({k: v for k, v in info.items() if k not in ("metadata", "arrays")})


@cache_app.command("verify")
def cache_verify(path: str = typer.Argument(..., help="Cache: a name or key of --cache-root, or a path/URL."), cache_root: Optional[str] = _cache_root_option()):
    """Check every byte (chunk and shard checksums) and every example of a cache; list each bad chunk; exit 1 if a problem is found."""
    from kvkd.cache.reader import CacheReader
    from kvkd.cache.store import locate

    try:
        reader = CacheReader.open(locate(path, cache_root or "")[0], allow_incomplete=True, local_root=None)
        with _progress("shards") as prog:
            task = prog.add_task("verify", total=reader.layout.num_shards, rate="")
            report = reader.verify_report(on_progress=lambda done, total: prog.update(task, completed=done, total=total))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    for note in report.notes:
        console.print(f"[yellow]note: {escape(note)}[/]", highlight=False)
    if report.problems:
        for p in report.problems:
            console.print(f"[red]- {escape(p)}[/]", highlight=False)
        raise typer.Exit(code=1)
    console.print("[green]cache OK[/]" + (" (no checksums to check)" if report.notes else ""))


@cache_app.command("ls")
def cache_ls(root: Optional[str] = typer.Argument(None, help="Cache root (folder or fsspec URL) [default: --cache-root's default: $KVKD_CACHE_ROOT, else $KVKD_HOME/caches]."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON (an array, one object per cache name) for scripts.")):
    """List the caches of a cache root: name, key, teacher, data, rows, M, codec, bytes, status (from the flags; nothing verified), who made it, when, kvkd version."""
    from kvkd.cache.errors import CacheError
    from kvkd.cache.store import CacheStore, list_caches

    try:
        store = CacheStore(root or "")
        if root and store.local and not os.path.exists(store.path):  # a mistyped root is not an empty one
            raise CacheError(f"cache root {store.root} does not exist: check the path (a root is made by the first "
                             f"`kvkd extract --out auto --cache-root {store.root}`)")
        root = store.root
        rows = list_caches(root)
    except (*ERRORS, OSError) as err:
        _fail(err)
    if as_json:
        print(json.dumps(rows, default=str, indent=1))
        return
    table = Table("name", "key", "teacher", "data", "rows", "M", "codec", "bytes", "status", "created by", "created at", "kvkd", title=f"caches under {root}")
    for r in rows:
        status = r["status"] if r["status"] != "incomplete" or r["written"] is None else f"incomplete ({r['written']}/{r['rows']} rows)"
        table.add_row(*(escape(str(x)) if x is not None else "-" for x in (r["name"], r["key"], r["teacher"], r["data"], r["rows"], r["slots"], r["codec"],
                      f"{r['bytes']:,}" if r["bytes"] is not None else None, status, r["created_by"], r["created"], r["kvkd_version"])))
    console.print(table)
    if not rows:
        console.print(f"no caches under {root} (write one with `kvkd extract --out auto --cache-root {root}`)", markup=False, highlight=False)


@cache_app.command("cp")
def cache_cp(src: str = typer.Argument(..., help="Source: a name or key of --cache-root, or a cache path/URL."),
             dst: str = typer.Argument(..., help="Destination cache path or fsspec URL (a rerun resumes a partial copy)."),
             cache_root: Optional[str] = _cache_root_option()):
    """Copy a cache (local <-> remote through fsspec), data first and its zarr.json last, then verify the copy with the cache's own checksums; exit 1 naming each bad chunk."""
    from kvkd.cache.store import CopyVerifyError, copy_cache, locate

    try:
        url, _ = locate(src, cache_root or "")
        with _progress("objects") as prog:
            task = prog.add_task("copy", total=None, rate="")
            result = copy_cache(url, dst, on_progress=lambda d, n: prog.update(task, completed=d, total=n))
    except CopyVerifyError as err:
        console.print(f"[bold red]error:[/] {escape(str(err).split(': ', 1)[0])}; rerun after fixing the source (the copy resumes):", highlight=False)
        for p in err.problems:
            console.print(f"[red]- {escape(p)}[/]", highlight=False)
        raise typer.Exit(code=1)
    except (*ERRORS, OSError) as err:
        _fail(err)
    console.print(f"copied {url} -> {dst}: {result.files_copied} object(s) copied ({result.bytes_copied:,} bytes), {result.files_skipped} already there; "
                  f"verified; status {result.status}", markup=False, highlight=False)


@cache_app.command("rm")
def cache_rm(spec: str = typer.Argument(..., help="A name or key of --cache-root, or a cache path/URL."),
             yes: bool = typer.Option(False, "--yes", help="Really remove it (nothing is asked interactively)."),
             force: bool = typer.Option(False, "--force", help="Remove an incomplete cache too (a cache with a live writer's claim never is)."),
             cache_root: Optional[str] = _cache_root_option()):
    """Remove a cache with its key record and names; refuses a cache being written, an incomplete one without --force, and anything without --yes."""
    from kvkd.cache.store import locate, remove_cache

    try:
        url, entry = locate(spec, cache_root or "")
        if not yes:
            names = f" (names: {', '.join(entry.names)})" if entry and entry.names else ""
            raise ConfigError(f"would remove {url}{names}: pass --yes to remove it")
        removed = remove_cache(spec, cache_root or "", force=force)
    except (*ERRORS, OSError) as err:
        _fail(err)
    console.print(f"removed {', '.join(removed)}", markup=False, highlight=False)


# ----------------------------------------------------------------------------- demo
@config_command(app, DemoConfig, "demo")
def demo(flags: dict, config: Optional[str]):
    """The main job with two teachers that differ: SmolLM2 on the gold CoT and on the traces it wrote itself (kvkd generate);
    extract both, train a LoRA student with a router, evaluate, report how the teachers differ."""
    from kvkd.demo import run_demo

    try:
        cfg = _resolve(DemoConfig, "demo", config, flags)
        with _progress("") as prog:
            task = prog.add_task("demo", total=None, rate="")

            def ext(p):
                prog.update(task, total=p.total, completed=p.done, rate=f"{p.tokens / max(p.elapsed_s, 1e-9):,.0f} tokens/s")

            def stp(e):
                prog.update(task, total=cfg.steps, completed=e.step, rate=f"loss {e.loss:.3f} ce {e.ce:.3f} {e.step_s:.2f} s/step")

            def stage(msg):
                prog.console.print(f"[bold cyan]>>[/] {msg}")
                prog.reset(task, description=msg.split(" ")[0])

            result = run_demo(cfg, on_stage=stage, progress={"generate": ext, "extract": ext, "train": stp, "eval": lambda d, n: prog.update(task, completed=d, total=n, rate="")})
    except ERRORS as err:
        _fail(err)
    for s in result.extract:
        console.print(f"cache {s['path']}: {s['examples']} examples, {s['tokens_per_s']:,.0f} tokens/s, {s['bytes_per_example']:,.0f} bytes/example")
    g = result.generate
    console.print(f"teacher's own solve rate: {g['correct']}/{g['traces']} = {g['accuracy']:.1%} [95% CI {g['ci_low']:.1%}, {g['ci_high']:.1%}], {g['tokens_per_s']:,.0f} tokens/s")
    table = Table("teacher", "rows", "rows with own trace", "mean NLL of the gold answer (nats/token)", "mean router weight", title="how the two teachers differ")
    for t in result.teachers:
        table.add_row(t["teacher"], str(t["rows"]), str(t["rows_with_own_trace"]), f"{t['mean_answer_nll']:.3f}", f"{t['mean_router_weight']:.3f}")
    console.print(table)
    console.print(f"training: {result.train['steps']} steps, {result.train['mean_step_s']:.2f} s/step, mean router weights {[round(w, 3) for w in result.train['mean_weights']]}")
    console.print(result.table)
    console.print(f"report: {result.report_dir}  (results.md, results.json, training.png)   wall time {result.wall_s:.0f} s")


# ----------------------------------------------------------------------------- sweep / report
@config_command(app, SweepConfig, "sweep")
def sweep(flags: dict, config: Optional[str]):
    """Run an experiment grid (rows x seeds, same data/steps/seeds), evaluate each run, write a comparison table and plots."""
    from kvkd.sweep import run_sweep

    try:
        cfg = resolve(SweepConfig, "sweep", config, flags)  # threads are set in each cell's process
        if not cfg.evals:
            raise ConfigError("no evaluation set: pass --eval PATH (e.g. --eval ../shared/data/gsm8k)")

        def on_cell(row, seed, status):
            console.print(f"[bold cyan]>>[/] {row} seed {seed}: {status}")

        import signal

        signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill -TERM stops the running cell too
        result = run_sweep(cfg, on_cell=on_cell)
    except ERRORS as err:
        _fail(err)
    console.print(result["table"])
    if result.get("missing"):
        console.print(f"[bold yellow]warning:[/] the table lacks {len(result['missing'])} cell(s): {', '.join(result['missing'])} "
                      "(marked MISSING in results.md and in results.csv's missing_seeds); rerun the same command to run them", highlight=False, soft_wrap=True)
    console.print(f"table: {cfg.out}/results.md, {result['csv']}; plots: {result['loss_png']}, {result['weights_png']}")


@app.command()
def report(
    run: str = typer.Argument(..., help="A `kvkd train` run folder."),
    out: Optional[str] = typer.Option(None, help="PNG path [default: RUN/training.png]."),
):
    """Plot one run: losses (total, CE, every distillation term per teacher) and router weights per teacher over steps."""
    from kvkd.eval.report import plot_run

    try:
        path = plot_run(run, out or os.path.join(run, "training.png"))
    except (ValueError, KeyError, FileNotFoundError) as err:
        _fail(err)
    console.print(f"plot: {path}")


def _storage_unreachable(err: BaseException) -> bool:
    """An object store / HTTP endpoint that cannot be reached (botocore, aiohttp, sockets)."""
    for e in (err, err.__cause__, err.__context__):
        if e is None:
            continue
        mod = type(e).__module__ or ""
        if (mod.startswith(("botocore", "aiobotocore", "aiohttp")) and "connect" in type(e).__name__.lower()) or isinstance(e, ConnectionError):
            return True
    return False


def main() -> None:  # pragma: no cover - tested through subprocesses
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except Exception as err:  # noqa: BLE001 - only the unreachable-endpoint case becomes one line
        if not _storage_unreachable(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: cannot reach the storage endpoint ({first}); check the URL, the endpoint "
              f"(AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for S3-compatible servers) and the network", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
