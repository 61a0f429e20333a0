"""The ``kvkd`` command line (Typer): parse, resolve the config, call one library function,
print a summary. Every option can also come from ``--config FILE`` (YAML/TOML/JSON, flat or
with a section per command); flags given on the command line override the file."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from kvkd.config import ConfigError, default_of, resolve
from kvkd.demo import DemoConfig
from kvkd.eval.evaluate import EvalConfig
from kvkd.pipeline.extract import ExtractConfig
from kvkd.sweep import SweepConfig
from kvkd.train.trainer import TrainConfig

app = typer.Typer(help="kvkd: multi-teacher KV-cache distillation of LLM reasoning (KaVa/CODI).", no_args_is_help=True, add_completion=False, rich_markup_mode=None)
cache_app = typer.Typer(help="Inspect and verify teacher caches.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(cache_app, name="cache")
console = Console()

CONFIG_HELP = "YAML/TOML/JSON file of options (flat, or a section per command); flags override it."


def _d(cls, name):
    return f"[default: {default_of(cls, name)}]"


def _rank() -> int:
    """This process's global rank under torchrun/deepspeed (RANK), 0 otherwise."""
    return int(os.environ.get("RANK", "0"))


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(code=2)


def _progress(unit: str) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
    )


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


# ----------------------------------------------------------------------------- extract
@app.command()
def extract(
    model: Optional[str] = typer.Option(None, help=f"Teacher: `smollm2` (packaged GGUF), a .gguf file, a model folder or a hub id. {_d(ExtractConfig, 'model')}"),
    data: Optional[str] = typer.Option(None, help="Data: a JSONL/TXT/JSON file, a folder (with --split), or a Hugging Face data set name."),
    out: Optional[str] = typer.Option(None, help="Output cache (Zarr v3 group): a path or an fsspec URL."),
    split: Optional[str] = typer.Option(None, help="Split (file stem in a folder, or hub split)."),
    data_format: Optional[str] = typer.Option(None, "--format", help=f"Data format: auto, jsonl, gsm8k, icot, svamp, hf. {_d(ExtractConfig, 'data_format')}"),
    offset: Optional[int] = typer.Option(None, help=f"First row used (rows). {_d(ExtractConfig, 'offset')}"),
    limit: Optional[int] = typer.Option(None, help="Number of rows used [default: all]."),
    trace: Optional[str] = typer.Option(None, help=f"CoT the teacher reads: nl (natural language) or equations. {_d(ExtractConfig, 'trace')}"),
    drop_last_step: Optional[bool] = typer.Option(None, "--drop-last-step/--keep-last-step", help=f"Drop the CoT's last step (CODI). {_d(ExtractConfig, 'drop_last_step')}"),
    trace_fallback: Optional[str] = typer.Option(None, help="Trace for rows whose --trace is empty (e.g. nl for GSM8K rows without equations) [default: none, such a row is an error]."),
    slots: Optional[int] = typer.Option(None, help=f"M: KV slots kept per (layer, KV head). {_d(ExtractConfig, 'slots')}"),
    lam: Optional[float] = typer.Option(None, "--lambda", help=f"KaVa eviction score weight of importance vs uniqueness, in [0, 1]. {_d(ExtractConfig, 'lam')}"),
    batch_size: Optional[int] = typer.Option(None, help=f"Examples per teacher forward. {_d(ExtractConfig, 'batch_size')}"),
    dtype: Optional[str] = typer.Option(None, help=f"Teacher dtype: float32, bfloat16, float16. {_d(ExtractConfig, 'dtype')}"),
    codec: Optional[str] = typer.Option(None, help=f"Storage codec: float16, bfloat16, int8 (with scales), float32. {_d(ExtractConfig, 'codec')}"),
    compressor: Optional[str] = typer.Option(None, help=f"Byte compressor: zstd:LEVEL, blosc:LEVEL:byte|bit|none, none. {_d(ExtractConfig, 'compressor')}"),
    examples_per_shard: Optional[int] = typer.Option(None, help="Examples per shard file (0 = about 32 MB of data per shard) [default: 0]."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace an existing cache at --out instead of resuming it."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Let the checkpoint run its own Python code (off by default)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (0 = torch's default) [default: 0]."),
    num_shards: Optional[int] = typer.Option(None, help="Parallel jobs writing this cache: job i takes the cache shards s with s % N == i (0 = RANK/WORLD_SIZE of torchrun/deepspeed, or one job) [default: 0]."),
    shard_index: Optional[int] = typer.Option(None, help="This job's index in [0, --num-shards)."),
    device: Optional[str] = typer.Option(None, help=f"auto (this rank's CUDA device if visible, else cpu), cpu or cuda[:N]. {_d(ExtractConfig, 'device')}"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Read only the teacher's config and tokenizer and the data; print shapes, tokens and the cache size; write nothing."),
    student: Optional[str] = typer.Option(None, help="With --dry-run: also show the layer map and projections against this student (config only)."),
    layer_map: Optional[str] = typer.Option(None, help="With --dry-run and --student: proportional, last, or teacher layers per student layer (0,2,4,5) [default: proportional]."),
    config: Optional[str] = typer.Option(None, help=CONFIG_HELP),
):
    """Run one teacher over a data set and write its compressed KV cache (resumable).

    Several jobs (`--num-shards N --shard-index i`) or ranks (`torchrun --nproc_per_node N -m kvkd.cli extract ...`)
    may write one cache at once; the last to finish marks it complete.
    """
    from kvkd.pipeline.extract import extract as run_extract

    flags = dict(model=model, data=data, out=out, split=split, data_format=data_format, offset=offset, limit=limit, trace=trace,
                 drop_last_step=drop_last_step, trace_fallback=trace_fallback, slots=slots, lam=lam, batch_size=batch_size, dtype=dtype, codec=codec,
                 compressor=compressor, examples_per_shard=examples_per_shard, overwrite=overwrite,
                 trust_remote_code=trust_remote_code, num_threads=threads, num_shards=num_shards, shard_index=shard_index, device=device)
    if dry_run:
        _extract_plan(flags, config, student, layer_map)
        return
    try:
        cfg = resolve(ExtractConfig, "extract", config, flags)
        with _progress("examples") as prog:
            task = prog.add_task("extract", total=None, rate="")

            def on_progress(p):
                prog.update(task, total=p.total, completed=p.done, rate=f"{p.tokens / max(p.elapsed_s, 1e-9):,.0f} tokens/s")

            summary = run_extract(cfg, on_progress=on_progress)
    except (ValueError, ConfigError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    for p in summary.problems:
        console.print(f"[yellow]skipped row {p['row']}: {p['reason']}[/]")
    _print_summary("extraction", asdict(summary))


def _extract_plan(flags: dict, config: Optional[str], student: Optional[str], layer_map: Optional[str]) -> None:
    """``kvkd extract --dry-run``: print the plan of an extraction."""
    from kvkd.models import ModelLoadError
    from kvkd.plan import plan_extraction
    from kvkd.train.align import parse_layer_map

    try:
        cfg = resolve(ExtractConfig, "extract", config, flags)
        plan = plan_extraction(cfg, student=student, layer_map_spec=parse_layer_map(layer_map) if layer_map else "proportional")
    except (ValueError, ConfigError, FileNotFoundError, ModelLoadError) as err:
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


# ----------------------------------------------------------------------------- train
def _router_options(weights: Optional[str], options: Optional[List[str]]) -> Optional[dict]:
    if weights is None and not options:
        return None
    out: dict = {}
    if weights:
        out["weights"] = [float(x) for x in weights.split(",")]
    for item in options or []:
        if "=" not in item:
            raise ConfigError(f"--router-option {item!r}: use KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _layer_map_option(values: Optional[List[str]]):
    """``--layer-map`` given once (all teachers) or once per teacher -> TrainConfig.layer_map."""
    from kvkd.train.align import parse_layer_map

    if not values:
        return None
    parsed = [parse_layer_map(v) for v in values]
    return parsed[0] if len(parsed) == 1 else parsed


def _router_names() -> list[str]:
    from kvkd.train.routers import ROUTERS

    return ROUTERS.names()


@app.command()
def train(
    cache: Optional[List[str]] = typer.Option(None, help="A teacher cache (path or URL); repeat for several teachers."),
    out: Optional[str] = typer.Option(None, help="Run folder (config, log.jsonl, checkpoints, summary); resumed if it has checkpoints."),
    student: Optional[str] = typer.Option(None, help=f"Student: smollm2, a .gguf, a folder or a hub id. {_d(TrainConfig, 'student')}"),
    data: Optional[str] = typer.Option(None, help="Training data [default: the data set recorded in the caches]."),
    split: Optional[str] = typer.Option(None, help="Split of --data."),
    data_format: Optional[str] = typer.Option(None, "--format", help="Format of --data (auto, jsonl, gsm8k, icot, svamp, multiarith, math, gsmhard, hf)."),
    offset: Optional[int] = typer.Option(None, help="First row of --data [default: the caches']."),
    limit: Optional[int] = typer.Option(None, help="Rows of --data [default: the caches']."),
    steps: Optional[int] = typer.Option(None, help=f"Optimiser steps. {_d(TrainConfig, 'steps')}"),
    batch_size: Optional[int] = typer.Option(None, help=f"Examples per step. {_d(TrainConfig, 'batch_size')}"),
    lr: Optional[float] = typer.Option(None, help=f"Peak learning rate (linear warm-up, linear decay). {_d(TrainConfig, 'lr')}"),
    warmup_steps: Optional[int] = typer.Option(None, help=f"Warm-up steps. {_d(TrainConfig, 'warmup_steps')}"),
    a1: Optional[float] = typer.Option(None, help=f"Weight of CODI's hidden-state loss. {_d(TrainConfig, 'a1')}"),
    a2: Optional[float] = typer.Option(None, help=f"Weight of KaVa's KV loss. {_d(TrainConfig, 'a2')}"),
    a3: Optional[float] = typer.Option(None, help=f"Weight of the CKA loss on boundary hidden states (0 = off). {_d(TrainConfig, 'a3')}"),
    kv_loss: Optional[str] = typer.Option(None, help=f"KV loss: smooth_l1 (p=1) or mse (p=2). {_d(TrainConfig, 'kv_loss')}"),
    kv_weighting: Optional[str] = typer.Option(None, help=f"KV loss per-slot weights: none or importance (cached answer->CoT attention). {_d(TrainConfig, 'kv_weighting')}"),
    fusion: Optional[str] = typer.Option(None, help=f"Teacher fusion: loss (weighted per-teacher losses) or target (weighted projected targets, one loss). {_d(TrainConfig, 'fusion')}"),
    hidden_loss: Optional[str] = typer.Option(None, help=f"CODI loss: smooth_l1 or mse. {_d(TrainConfig, 'hidden_loss')}"),
    std_norm: Optional[bool] = typer.Option(None, "--std-norm/--no-std-norm", help=f"Per-layer teacher-std normalisation of the distillation losses. {_d(TrainConfig, 'std_norm')}"),
    router: Optional[str] = typer.Option(None, help=f"Router: {', '.join(_router_names())}. {_d(TrainConfig, 'router')}"),
    router_weights: Optional[str] = typer.Option(None, help="Fixed router weights, comma-separated, one per --cache (normalised)."),
    router_option: Optional[List[str]] = typer.Option(None, help="Router option KEY=VALUE (JSON value), e.g. temperature=0.5; repeatable."),
    layer_map: Optional[List[str]] = typer.Option(None, help=f"Teacher layer for each student layer: proportional, last, or a list like 0,2,4,5; give it once for all teachers or once per --cache, in order. {_d(TrainConfig, 'layer_map')}"),
    require_same_tokenizer: Optional[bool] = typer.Option(None, "--require-same-tokenizer/--allow-other-tokenizers", help="Refuse teachers whose tokenizer differs from the student's (latent distillation does not need it) [default: allow]."),
    align_fit_rows: Optional[int] = typer.Option(None, help=f"Cached rows per teacher used to fit the fixed bases of shrinking projections. {_d(TrainConfig, 'align_fit_rows')}"),
    lora: Optional[bool] = typer.Option(None, "--lora/--no-lora", help="Train LoRA adapters (peft) instead of all weights [default: lora]."),
    lora_r: Optional[int] = typer.Option(None, help=f"LoRA rank. {_d(TrainConfig, 'lora_r')}"),
    lora_alpha: Optional[int] = typer.Option(None, help=f"LoRA alpha. {_d(TrainConfig, 'lora_alpha')}"),
    latents: Optional[int] = typer.Option(None, help="M continuous thoughts (0 = the caches' M) [default: 0]."),
    seed: Optional[int] = typer.Option(None, help=f"Random seed. {_d(TrainConfig, 'seed')}"),
    workers: Optional[int] = typer.Option(None, help=f"DataLoader worker processes reading the caches. {_d(TrainConfig, 'num_workers')}"),
    save_every: Optional[int] = typer.Option(None, help=f"Steps between checkpoints (0 = at the end only). {_d(TrainConfig, 'save_every')}"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (0 = torch's default) [default: 0]."),
    device: Optional[str] = typer.Option(None, help=f"auto, cpu or cuda[:N] (without --deepspeed). {_d(TrainConfig, 'device')}"),
    deepspeed: Optional[str] = typer.Option(None, help="DeepSpeed JSON config (ZeRO 1/2/3, offload, bf16; e.g. kvkd/configs/ds_zero2.json); launch with `deepspeed` or `torchrun`."),
    local_rank: Optional[int] = typer.Option(None, "--local_rank", "--local-rank", hidden=True, help="Set by the deepspeed launcher; the rank is read from LOCAL_RANK."),
    config: Optional[str] = typer.Option(None, help=CONFIG_HELP),
):
    """Train a latent (CODI/KaVa) student against teacher caches with a router; no teacher is loaded.

    With --deepspeed, run one process per rank: `torchrun --nproc_per_node N -m kvkd.cli train --deepspeed ds.json ...`
    or `deepspeed --module kvkd.cli train --deepspeed ds.json ...`; rank 0 prints and writes the run folder.
    """
    from kvkd.train.trainer import train as run_train

    try:
        flags = dict(caches=cache or None, out=out, student=student, data=data, split=split, data_format=data_format, offset=offset,
                     limit=limit, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, a1=a1, a2=a2, a3=a3, kv_loss=kv_loss,
                     kv_weighting=kv_weighting, fusion=fusion, hidden_loss=hidden_loss, std_norm=std_norm, router=router, router_options=_router_options(router_weights, router_option),
                     layer_map=_layer_map_option(layer_map), require_same_tokenizer=require_same_tokenizer,
                     align_fit_rows=align_fit_rows, use_lora=lora, lora_r=lora_r, lora_alpha=lora_alpha, latents=latents, seed=seed,
                     num_workers=workers, save_every=save_every, num_threads=threads, device=device, deepspeed=deepspeed)
        cfg = resolve(TrainConfig, "train", config, flags)
        if _rank() != 0:  # other ranks train silently; rank 0 shows progress and the summary
            run_train(cfg)
            return
        with _progress("steps") as prog:
            task = prog.add_task("train", total=cfg.steps, rate="")

            def on_step(e):
                w = " ".join(f"{x:.2f}" for x in e.weights)
                prog.update(task, completed=e.step, rate=f"loss {e.loss:.3f} ce {e.ce:.3f} w [{w}] {e.step_s:.2f} s/step")

            summary = run_train(cfg, on_step=on_step)
    except (ValueError, KeyError, TypeError, ConfigError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    _print_teachers(summary.run_dir)
    _print_summary("training", asdict(summary))


# ----------------------------------------------------------------------------- eval
@app.command("eval")
def eval_cmd(
    run: Optional[str] = typer.Option(None, help="A `kvkd train` run folder or a `kvkd export` folder (latent mode)."),
    model: Optional[str] = typer.Option(None, help="A plain model (smollm2, .gguf, folder, hub id) for the nocot/cot baselines or --untrained."),
    mode: Optional[str] = typer.Option(None, help=f"latent, nocot or cot. {_d(EvalConfig, 'mode')}"),
    untrained: Optional[bool] = typer.Option(None, "--untrained", help="Latent mode with a fresh, untrained latent student built from --model."),
    latents: Optional[int] = typer.Option(None, help=f"M for --untrained. {_d(EvalConfig, 'latents')}"),
    data: Optional[str] = typer.Option(None, help="Evaluation data (file, folder with --split, or hub name)."),
    split: Optional[str] = typer.Option(None, help="Split of --data."),
    data_format: Optional[str] = typer.Option(None, "--format", help="Format of --data (auto, jsonl, gsm8k, icot, svamp, multiarith, math, gsmhard, hf)."),
    offset: Optional[int] = typer.Option(None, help=f"First row. {_d(EvalConfig, 'offset')}"),
    limit: Optional[int] = typer.Option(None, help="Rows evaluated [default: all]."),
    batch_size: Optional[int] = typer.Option(None, help=f"Examples per decoding batch. {_d(EvalConfig, 'batch_size')}"),
    max_new_tokens: Optional[int] = typer.Option(None, help=f"Generated tokens at most (answer). {_d(EvalConfig, 'max_new_tokens')}"),
    answer_check: Optional[str] = typer.Option(None, help=f"numeric (GSM8K-style) or math (math-verify, MATH500). {_d(EvalConfig, 'answer_check')}"),
    out: Optional[str] = typer.Option(None, help="Per-example predictions JSONL [default: RUN/predictions.jsonl or ./predictions.jsonl]."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (0 = default) [default: 0]."),
    device: Optional[str] = typer.Option(None, help=f"auto (CUDA if visible, else cpu), cpu or cuda[:N]. {_d(EvalConfig, 'device')}"),
    config: Optional[str] = typer.Option(None, help=CONFIG_HELP),
):
    """Evaluate a trained run (latent decoding) or a plain model; accuracy with 95% CI and gold-answer NLL."""
    from kvkd.eval.evaluate import evaluate
    from kvkd.eval.report import results_table

    flags = dict(run=run, model=model, mode=mode, untrained=untrained, latents=latents, data=data, split=split, data_format=data_format,
                 offset=offset, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens, answer_check=answer_check, out=out,
                 num_threads=threads, device=device)
    try:
        cfg = resolve(EvalConfig, "eval", config, flags)
        if not cfg.data:
            raise ConfigError("no evaluation data: pass --data")
        with _progress("examples") as prog:
            task = prog.add_task("eval", total=None, rate="")
            result = evaluate(cfg, on_progress=lambda d, n: prog.update(task, completed=d, total=n))
    except (ValueError, KeyError, ConfigError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    console.print(results_table([result]))
    console.print(f"predictions: {result.predictions}")


# ----------------------------------------------------------------------------- export
@app.command()
def export(
    run: str = typer.Option(..., help="A `kvkd train` run folder (plain or DeepSpeed); its newest checkpoint is exported."),
    out: str = typer.Option(..., help="Folder to write: a Hugging Face model (LoRA merged) + tokenizer + latent head."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an existing non-empty folder."),
):
    """Export a trained student as a normal Hugging Face folder (transformers loads it) plus its latent head
    (CODI projection, <bot>/<eot> vectors, M) that `kvkd eval --run FOLDER` uses; aligners and router are left out."""
    from kvkd.train.export import export_run

    try:
        path = export_run(run, out, overwrite=overwrite)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        _fail(err)
    console.print(f"exported {run} -> {path}")


# ----------------------------------------------------------------------------- cache
@cache_app.command("info")
def cache_info(path: str = typer.Argument(..., help="Cache path or URL."), as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Print a cache's metadata, array shapes, dtypes, codecs and sizes."""
    from kvkd.cache.reader import CacheReader

    try:
        info = CacheReader.open(path, allow_incomplete=True).info()
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    meta = info.get("metadata", {})
    tok = meta.get("tokenizer", {})
    _print_summary(f"cache {path}", {
        "tokenizer vocab_size": f"{tok.get('vocab_size')} (len(tokenizer): every id it emits, added tokens included; not the embedding size)",
        "tokenizer hash": f"{tok.get('hash')} (vocabulary, merges, special tokens, pre-tokenisation)",
        **meta,
    })
    table = Table("array", "shape", "dtype", "chunks", "shards", "codecs", "stored bytes")
    for name, a in info.get("arrays", {}).items():
        table.add_row(name, str(a.get("shape")), str(a.get("dtype")), str(a.get("chunks")), str(a.get("shards")), _codec_names(a.get("codecs")), f"{a.get('stored_bytes', 0):,}")
    console.print(table)
    console.print({k: v for k, v in info.items() if k not in ("metadata", "arrays")})


@cache_app.command("verify")
def cache_verify(path: str = typer.Argument(..., help="Cache path or URL.")):
    """Check a cache's flags, values and status; exit 1 if a problem is found."""
    from kvkd.cache.reader import CacheReader

    try:
        problems = CacheReader.open(path, allow_incomplete=True).verify()
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    if problems:
        for p in problems:
            console.print(f"[red]- {p}[/]")
        raise typer.Exit(code=1)
    console.print("[green]cache OK[/]")


# ----------------------------------------------------------------------------- demo
@app.command()
def demo(
    out: Optional[str] = typer.Option(None, help=f"Output folder. {_d(DemoConfig, 'out')}"),
    model: Optional[str] = typer.Option(None, help=f"Teacher and student model. {_d(DemoConfig, 'model')}"),
    data_dir: Optional[str] = typer.Option(None, help="GSM8K folder with train.jsonl/test.jsonl [default: the packaged 64/40-row sample]."),
    train_rows: Optional[int] = typer.Option(None, help=f"Training rows extracted and trained on. {_d(DemoConfig, 'train_rows')}"),
    test_rows: Optional[int] = typer.Option(None, help=f"Test rows evaluated. {_d(DemoConfig, 'test_rows')}"),
    steps: Optional[int] = typer.Option(None, help=f"Training steps. {_d(DemoConfig, 'steps')}"),
    batch_size: Optional[int] = typer.Option(None, help=f"Training batch size. {_d(DemoConfig, 'batch_size')}"),
    slots: Optional[int] = typer.Option(None, help=f"M slots / latent thoughts. {_d(DemoConfig, 'slots')}"),
    router: Optional[str] = typer.Option(None, help=f"Router. {_d(DemoConfig, 'router')}"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (0 = default) [default: 0]."),
    config: Optional[str] = typer.Option(None, help=CONFIG_HELP),
):
    """The main job: extract two SmolLM2 teachers (NL and equation CoT), train a LoRA student with a router, evaluate, report."""
    from kvkd.demo import run_demo

    flags = dict(out=out, model=model, data_dir=data_dir, train_rows=train_rows, test_rows=test_rows, steps=steps,
                 batch_size=batch_size, slots=slots, router=router, threads=threads)
    try:
        cfg = resolve(DemoConfig, "demo", config, flags)
        with _progress("") as prog:
            task = prog.add_task("demo", total=None, rate="")

            def ext(p):
                prog.update(task, total=p.total, completed=p.done, rate=f"{p.tokens / max(p.elapsed_s, 1e-9):,.0f} tokens/s")

            def stp(e):
                prog.update(task, total=cfg.steps, completed=e.step, rate=f"loss {e.loss:.3f} ce {e.ce:.3f} {e.step_s:.2f} s/step")

            def stage(msg):
                prog.console.print(f"[bold cyan]>>[/] {msg}")
                prog.reset(task, description=msg.split(" ")[0])

            result = run_demo(cfg, on_stage=stage, progress={"extract": ext, "train": stp, "eval": lambda d, n: prog.update(task, completed=d, total=n, rate="")})
    except (ValueError, KeyError, ConfigError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    for s in result.extract:
        console.print(f"cache {s['path']}: {s['examples']} examples, {s['tokens_per_s']:,.0f} tokens/s, {s['bytes_per_example']:,.0f} bytes/example")
    console.print(f"training: {result.train['steps']} steps, {result.train['mean_step_s']:.2f} s/step, mean router weights {[round(w, 3) for w in result.train['mean_weights']]}")
    console.print(result.table)
    console.print(f"report: {result.report_dir}  (results.md, results.json, training.png)   wall time {result.wall_s:.0f} s")


# ----------------------------------------------------------------------------- sweep / report
@app.command()
def sweep(
    cache: Optional[List[str]] = typer.Option(None, help="A teacher cache; repeat for several teachers (the first is the single-teacher rows' teacher)."),
    grid: Optional[str] = typer.Option(None, help=f"Built-in grid (plan) or a YAML/JSON file of rows. {_d(SweepConfig, 'grid')}"),
    out: Optional[str] = typer.Option(None, help=f"Output folder (cells, results.md/.csv, loss.png, weights.png); resumed if present. {_d(SweepConfig, 'out')}"),
    rows: Optional[str] = typer.Option(None, help="Comma-separated row names to run [default: all rows]."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds; every row runs once per seed [default: 0,1]."),
    student: Optional[str] = typer.Option(None, help=f"Student spec. {_d(SweepConfig, 'student')}"),
    steps: Optional[int] = typer.Option(None, help=f"Optimiser steps per run. {_d(SweepConfig, 'steps')}"),
    batch_size: Optional[int] = typer.Option(None, help=f"Examples per step. {_d(SweepConfig, 'batch_size')}"),
    lr: Optional[float] = typer.Option(None, help=f"Peak learning rate. {_d(SweepConfig, 'lr')}"),
    warmup_steps: Optional[int] = typer.Option(None, help=f"Warm-up steps. {_d(SweepConfig, 'warmup_steps')}"),
    train_option: Optional[List[str]] = typer.Option(None, help="Training option shared by every row, KEY=VALUE (JSON value), e.g. lora_r=8; repeatable."),
    eval_set: Optional[List[str]] = typer.Option(None, "--eval", help="Evaluation set PATH or NAME=PATH (file, or folder read with --eval-split); repeatable."),
    eval_split: Optional[str] = typer.Option(None, help=f"Split of folder eval sets. {_d(SweepConfig, 'eval_split')}"),
    eval_limit: Optional[int] = typer.Option(None, help=f"Rows per eval set. {_d(SweepConfig, 'eval_limit')}"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads per cell (0 = default) [default: 0]."),
    config: Optional[str] = typer.Option(None, help=CONFIG_HELP),
):
    """Run an experiment grid (rows x seeds, same data/steps/seeds), evaluate each run, write a comparison table and plots."""
    from kvkd.sweep import run_sweep

    def _list(text, cast=str):
        return [cast(x.strip()) for x in text.split(",") if x.strip()] if text else None

    try:
        flags = dict(caches=cache or None, grid=grid, out=out, rows=_list(rows), seeds=_list(seeds, int), student=student, steps=steps,
                     batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, train=_router_options(None, train_option),
                     evals=eval_set or None, eval_split=eval_split, eval_limit=eval_limit, num_threads=threads)
        cfg = resolve(SweepConfig, "sweep", config, flags)
        if not cfg.evals:
            raise ConfigError("no evaluation set: pass --eval PATH (e.g. --eval ../shared/data/gsm8k)")

        def on_cell(row, seed, status):
            console.print(f"[bold cyan]>>[/] {row} seed {seed}: {status}")

        import signal

        signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill -TERM stops the running cell too
        result = run_sweep(cfg, on_cell=on_cell)
    except (ValueError, KeyError, TypeError, ConfigError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    console.print(result["table"])
    console.print(f"table: {cfg.out}/results.md, {result['csv']}; plots: {result['loss_png']}, {result['weights_png']}")


@app.command()
def report(
    run: str = typer.Argument(..., help="A `kvkd train` run folder."),
    out: Optional[str] = typer.Option(None, help="PNG path [default: RUN/training.png]."),
):
    """Plot one run: losses (total, CE, per-teacher CODI/KV/CKA) and router weights per teacher over steps."""
    from kvkd.eval.report import plot_run

    try:
        path = plot_run(run, out or os.path.join(run, "training.png"))
    except (ValueError, KeyError, FileNotFoundError) as err:
        _fail(err)
    console.print(f"plot: {path}")


def main() -> None:  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
