"""Options of ``kvkd train``, declared once (default, help, CLI name) in groups that other
commands share: the optimiser (``kvkd sweep``, ``kvkd demo``), LoRA, the distillation losses,
the loader, plus :class:`kvkd.config.DataSelection` and :class:`kvkd.config.RuntimeArgs`.

``kvkd.cli`` generates ``kvkd train``'s flags from :class:`TrainConfig`; a config file may
give any of them flat or inside a group section (``optimiser:``, ``lora:``, ``losses:``,
``loader:``, ``data:``, ``runtime:``).
"""

from __future__ import annotations

import dataclasses
import json

from kvkd.cache.store import StoreArgs
from kvkd.config import ConfigError, DataSelection, RuntimeArgs, group, opt, override
from kvkd.train.losses import FUSIONS, KV_WEIGHTINGS, LOSS_KINDS, loss_option_fields, terms  # noqa: F401  (re-exported)


@group("optimiser")
class OptimArgs:
    """AdamW with linear warm-up then linear decay to 0.

    Attributes:
        steps: optimiser steps; batch_size: examples per forward (the global micro-batch).
        grad_accum: micro-batches whose gradients add up before each optimiser step; the
            effective batch is ``batch_size * grad_accum`` (Coconut's and KaVa's tables need 128).
        lr: peak learning rate; warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay; grad_clip: max global gradient norm.
        seed: RNG seed (initialisation, batch order, dropout).
    """

    steps: int = opt(100, help="Optimiser steps")
    batch_size: int = opt(8, help="Examples per forward (the global micro-batch over all ranks)")
    grad_accum: int = opt(1, help="Gradient accumulation: micro-batches per optimiser step (effective batch = --batch-size x --grad-accum)")
    lr: float = opt(2e-4, help="Peak learning rate (linear warm-up, then linear decay to 0)")
    warmup_steps: int = opt(10, help="Linear warm-up steps")
    weight_decay: float = opt(0.0, help="AdamW weight decay")
    grad_clip: float = opt(2.0, help="Max global gradient norm")
    seed: int = opt(0, help="Random seed (initialisation, batch order, dropout)")


@group("lora")
class LoraArgs:
    """peft LoRA settings (CODI's defaults are r=128, alpha=32; r=16 keeps CPU runs small).

    Attributes:
        use_lora: train LoRA adapters instead of all weights.
        lora_r, lora_alpha, lora_dropout: rank, alpha and dropout.
        lora_targets: ``all-linear`` or comma-separated module names.
    """

    use_lora: bool = opt(True, cli="lora/no-lora", help="Train LoRA adapters (peft) instead of all weights")
    lora_r: int = opt(16, help="LoRA rank")
    lora_alpha: int = opt(32, help="LoRA alpha")
    lora_dropout: float = opt(0.0, help="LoRA dropout")
    lora_targets: str = opt("all-linear", help="LoRA target modules: all-linear or comma-separated module names")


def _loss_args() -> type:
    """The ``losses`` group, built from the registered distillation terms: each term module
    (``kvkd/train/losses/*.py``) declares its weight and options with :func:`kvkd.config.opt`,
    so a new term brings its flags without an edit here."""
    fields = loss_option_fields()
    doc = ["Weights and forms of the distillation terms: ``CE + " + " + ".join(f"{t.weight} L_{t.name}" for t in terms()) + "``.", "", "Attributes:"]
    doc += [f"    {name}: {f.metadata['help']}." for name, _, f in fields]
    ns = {"__annotations__": {name: tp for name, tp, _ in fields}, **{name: f for name, _, f in fields}, "__doc__": "\n".join(doc), "__module__": __name__}
    return group("losses")(type("LossArgs", (), ns))


LossArgs = _loss_args()


@group("loader")
class LoaderArgs:
    """The DataLoader that streams the caches.

    Attributes:
        num_workers: worker processes reading the caches (0 = in the training process).
        prefetch_factor: batches each worker reads ahead.
    """

    num_workers: int = opt(1, cli="workers", help="DataLoader worker processes reading the caches (0 = in the training process)")
    prefetch_factor: int = opt(4, help="Batches each DataLoader worker reads ahead")


@group("checkpoints")
class CheckpointArgs:
    """The run folder's checkpoints and engine, shared by ``kvkd train`` and ``kvkd sft``
    (``kvkd.train.rundir``: a rerun of the same command resumes from the newest checkpoint).

    Attributes:
        save_every: steps between checkpoints (0 = only at the end); keep_checkpoints: newest
            checkpoints kept.
        deepspeed: DeepSpeed JSON config path (ZeRO 1/2/3, offload, bf16); empty = one process
            without DeepSpeed. See ``kvkd.train.engines``.
        fresh: delete the folder's checkpoints, log, summary and config and start over (without
            it a folder with checkpoints resumes, and only ``RESUMABLE_OPTIONS`` of
            ``kvkd.train.rundir`` may differ from its ``config.json``).
    """

    save_every: int = opt(50, help="Steps between checkpoints (0 = at the end only)")
    keep_checkpoints: int = opt(2, help="Newest checkpoints kept")
    deepspeed: str = opt("", help="DeepSpeed JSON config (ZeRO 1/2/3, offload, bf16; e.g. kvkd/configs/ds_zero2.json); launch with deepspeed or torchrun")
    fresh: bool = opt(False, cli="fresh/no-fresh", help="Start the run over: delete the run folder's checkpoints, log, summary and config first (otherwise a run folder resumes)")


def _router_names() -> list[str]:
    from kvkd.train.routers import ROUTERS

    return ROUTERS.names()


def parse_key_values(items: list[str] | str | None, flag: str = "--router-option") -> dict:
    """``["temperature=0.5", "ema=0.9"]`` -> ``{"temperature": 0.5, "ema": 0.9}`` (values JSON,
    else strings).

    Raises:
        ConfigError: an item without ``=``.
    """
    out: dict = {}
    for item in [items] if isinstance(items, str) else items or []:
        if "=" not in item:
            raise ConfigError(f"{flag} {item!r}: use KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _parse_layer_maps(values: list[str]):
    from kvkd.train.align import parse_layer_map

    parsed = [parse_layer_map(v) for v in values]
    return parsed[0] if len(parsed) == 1 else parsed


def _parse_weights(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--router-weights {text!r}: give comma-separated numbers, one per --cache (e.g. 0.7,0.3)") from None


@dataclasses.dataclass
class TrainConfig(DataSelection, OptimArgs, LossArgs, LoraArgs, LoaderArgs, CheckpointArgs, RuntimeArgs, StoreArgs):
    """Options of ``kvkd train`` (defaults live here and in the groups it inherits, only there).

    Attributes (besides the groups' — data, optimiser, losses, LoRA, loader, checkpoints, runtime):
        caches: teacher cache paths/URLs (one per teacher).
        out: run folder.
        student: student spec (``smollm2``, .gguf, folder or hub id).
        router: router name (``fixed``, ``similarity``, ``learnable``, ...).
        router_weights: fixed weights, one per cache (``router_options["weights"]``).
        router_options: keyword options of the router (e.g. ``{"temperature": 0.5}``).
        layer_map: teacher layer for each student layer: ``proportional`` (depth-proportional,
            any shapes), ``last`` (the teacher's last L_s layers), or an explicit list of L_s
            teacher layers; one value for every teacher, or a list with one per teacher (in
            ``caches`` order), e.g. ``["proportional", "last", [0, 2, 4, 5]]``.
        align_fit_rows: cached rows read per teacher to fit the fixed principal bases of the
            projections that shrink a teacher space (see ``kvkd.train.align``).
        latents: M continuous thoughts; 0 = the caches' slot budget M.
        require_same_tokenizer: refuse teachers whose tokenizer differs from the student's (or
            from each other's). Off by default: latent distillation needs no token
            correspondence; the run records which teachers share the student's tokenizer.
        dtype: student dtype.
        log_every: steps between progress callbacks.
        log_row_weights: also log each step's per-sample router weights with their training-row
            indices (``row_weights`` in ``log.jsonl``; rank 0's rows under DeepSpeed).
        report_to: sinks besides ``log.jsonl`` (``kvkd.train.sinks``): ``none``, ``tensorboard``,
            ``wandb``, ``trackio``, comma-separated.
        max_nonfinite_steps: steps with a NaN/inf loss or gradient skipped (no update, counted
            in the log) before training stops with an error; 0 = stop at the first.
        eval_data: an evaluation set (file, or folder: its ``test`` split or only split); training
            is refused before it starts if any eval question (normalised text) or id is among
            the training rows (``kvkd.eval.overlap``). Empty = no check.
        valid_data, valid_every, valid_limit: held-out rows scored (gold-answer NLL) every
            ``valid_every`` steps and at the last step, logged as ``valid_nll``; the best
            checkpoint by it is kept in ``RUN/best`` (see ``kvkd.eval.validation``). Rows among
            the training rows or the eval set are refused.
    """

    caches: list[str] = opt(factory=list, cli="cache", help="A teacher cache: a path or URL, or a name or key of --cache-root; repeat for several teachers")
    out: str = opt("", help="Run folder (config, log.jsonl, checkpoints, summary); resumed if it has checkpoints")
    student: str = opt("smollm2", help="Student: smollm2 (packaged GGUF), a .gguf, a model folder or a hub id")
    router: str = opt("fixed", help="Router (see the README's table)", choices=_router_names)
    router_weights: list[float] | None = opt(None, help="Fixed router weights, comma-separated, one per --cache (normalised)", cli_type=str, parse=_parse_weights)
    router_options: dict = opt(factory=dict, cli="router-option", cli_type=list[str], parse=parse_key_values,
                               help="Router option KEY=VALUE (JSON value), e.g. temperature=0.5; repeatable")
    layer_map: str | list = opt("proportional", cli_type=list[str], parse=_parse_layer_maps,
                                help="Teacher layer for each student layer: proportional, last, or a list like 0,2,4,5; once for all teachers or once per --cache, in order")
    align_fit_rows: int = opt(256, help="Cached rows per teacher used to fit the fixed bases of shrinking projections")
    latents: int = opt(0, help="M continuous thoughts (0 = the caches' M)")
    require_same_tokenizer: bool = opt(False, cli="require-same-tokenizer/allow-other-tokenizers",
                                       help="Refuse teachers whose tokenizer differs from the student's (latent distillation does not need it)")
    dtype: str = opt("float32", help="Student dtype: float32, bfloat16 or float16", choices=("float32", "bfloat16", "float16"))
    log_every: int = opt(1, help="Steps between progress reports (terminal bar or plain log line)")
    log_row_weights: bool = opt(False, help="Write each step's per-sample router weights and row indices into log.jsonl (row_weights)")
    report_to: str = opt("none", help="Also report every step to: none, tensorboard (RUN/tensorboard), wandb, trackio; comma-separated for several (log.jsonl is always written)")
    max_nonfinite_steps: int = opt(3, help="Steps with a NaN/inf loss or gradient that are skipped (no update) before training stops with an error (0 = stop at the first)")
    eval_data: str = opt("", help="Evaluation set (file, or folder: its test split) checked before training: refused if any of its questions is among the training rows")
    valid_data: str = opt("", help="Held-out validation rows (file, or folder: its valid split): gold-answer NLL logged as valid_nll, best checkpoint kept in RUN/best")
    valid_every: int = opt(0, help="Steps between validations on --valid-data (0 = at the last step only)")
    valid_limit: int | None = opt(200, help="Validation rows used at most (none = all)")

    def __post_init__(self):
        if self.router_weights is not None:  # one place for fixed weights: the router's options
            self.router_options = {**self.router_options, "weights": list(self.router_weights)}
            self.router_weights = None
