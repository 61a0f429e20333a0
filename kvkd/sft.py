"""``kvkd sft``: supervised fine-tuning of a teacher or baseline on (question, trace, answer) text.

Modes (the text layouts of ``kvkd eval``'s plain-model modes, so an SFT model is evaluated the
way it was trained):

- ``cot`` (CoT-SFT, the usual teacher): prompt ``{question}\\n``, target
  ``{trace}\\nThe answer is: {answer}<eos>``.
- ``nocot`` (No-CoT-SFT baseline of KaVa's table): prompt ``{question}\\nThe answer is:``,
  target `` {answer}<eos>``.

The loss of a step is the mean cross-entropy over the target tokens of all its rows (prompt
and padding are masked, labels -100), whatever its split into micro-batches (``--grad-accum``)
and ranks (DeepSpeed): batch 8 x 2 accumulation steps and batch 16 are the same update. The data is any ``--data`` kvkd reads; a trace file of ``kvkd generate``
(``--format trace``, detected) trains on the teacher's own kept traces. The trace of a data
set row is its whole gold CoT (``--trace nl|equations``; no step is dropped).

kvkd's own loop on kvkd's training engines (:mod:`kvkd.train.engines`: the plain engine, AdamW
with linear warm-up/decay and clipping, or DeepSpeed ZeRO-1/2 with ``--deepspeed``; ``--grad-accum``
on both) rather than TRL's ``SFTTrainer``: the options, the seeded batch order and the run folder
stay those of ``kvkd train``, and no second training stack is needed.

The run folder is a :class:`kvkd.train.rundir.RunDir`: ``config.json``, ``log.jsonl``,
``checkpoints/step-N/``, ``summary.json`` and ``model/``, a normal Hugging Face folder (LoRA merged)
that ``kvkd generate``, ``kvkd extract`` and ``kvkd eval`` take as ``--model``. A rerun of the same
command resumes from the newest checkpoint, by the rules of ``kvkd train``: the folder is locked
while one process trains in it, options other than ``RESUMABLE_OPTIONS`` (``--steps`` may grow)
must equal ``config.json``, and so must the selected rows (their data fingerprint); ``--fresh``
starts over and a finished run is reported, not retrained. A NaN/inf loss or gradient stops the
run at once (no checkpoint of diverged weights is written). ``model/`` is written beside its name
and renamed into place; a finished run without it (killed while exporting) is exported again
from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from kvkd.config import DataSelection, RuntimeArgs, opt, override
from kvkd.data import TRACE_KINDS, Example, build_trace, dataset_fingerprint, load_examples
from kvkd.models import load_model
from kvkd.prompts import PromptTemplate
from kvkd.train.engines import build_engine, check_batches_split, check_deepspeed_launch
from kvkd.train.options import CheckpointArgs, LoraArgs, OptimArgs, TrainConfig
from kvkd.train.rundir import WEIGHTS, NonFiniteError, RunDir, RunFolderError, check_resume, copy_state, disk_error, make_readable, record_provenance, resume_point
from kvkd.train.student import make_trainable
from kvkd.train.trainer import _batches, _is_local, _rank, micro_batches

SFT_MODES = ("cot", "nocot")
MODEL = "model"  # the exported Hugging Face folder inside the run folder


@dataclass
class SFTConfig(DataSelection, OptimArgs, LoraArgs, CheckpointArgs, RuntimeArgs):
    """Options of ``kvkd sft`` (besides the data, optimiser, LoRA, checkpoints and runtime groups).

    Attributes:
        model: the model to fine-tune (``smollm2``, a .gguf, a folder, a hub id).
        out: run folder (config, log, checkpoints, summary, ``model/``); resumed if it has checkpoints.
        mode: ``cot`` or ``nocot`` (see the module docstring).
        trace: a data set row's trace (``nl`` or ``equations``); a trace file's rows carry theirs.
        dtype: dtype of the weights while training.
        max_tokens: rows longer than this (prompt + target tokens) are refused.
        log_every: steps between progress callbacks.
    """

    offset: int | None = override(DataSelection, "offset", 0, "")
    model: str = opt("smollm2", help="Model to fine-tune: smollm2 (packaged GGUF), a .gguf, a model folder or a hub id")
    out: str = opt("", help="Run folder: config.json, log.jsonl, checkpoints, summary.json and model/ (a Hugging Face folder); resumed if it has checkpoints")
    mode: str = opt("cot", help="cot (CoT-SFT: reasoning then answer) or nocot (No-CoT-SFT: the answer only)", choices=SFT_MODES)
    trace: str = opt("nl", help="A data set row's CoT: nl or equations (trace files carry their own)", choices=TRACE_KINDS)
    dtype: str = opt("float32", help="Training dtype: float32, bfloat16 or float16", choices=("float32", "bfloat16", "float16"))
    max_tokens: int = opt(1024, help="Longest row (prompt + target tokens); longer rows are an error")
    log_every: int = override(TrainConfig, "log_every", 1, "")


@dataclass
class SFTStep:
    """One optimiser step as logged: step, target-token CE (nats/token), learning rate, seconds."""

    step: int
    loss: float
    lr: float
    step_s: float


@dataclass
class SFTSummary:
    """What a run did (the CLI prints it), from its whole log (resumes included): ``steps`` done,
    the first and last step's target-token CE, ``steps_run`` = steps this call trained (0: the run
    was finished), ``resumed_from`` = steps done before it; ``wall_s`` = this call's wall time."""

    run_dir: str
    model_dir: str
    mode: str
    rows: int
    steps: int
    effective_batch: int
    first_loss: float
    final_loss: float
    wall_s: float
    resumed_from: int = 0
    steps_run: int = 0


def sft_texts(ex: Example, mode: str, trace: str = "nl", template: PromptTemplate = PromptTemplate()) -> tuple[str, str]:
    """(prompt, target) of one row (module docstring); the EOS token is appended by :func:`tokenize_sft`."""
    if mode == "nocot":
        return template.question_text(ex.question) + template.answer_prefix, " " + ex.answer
    cot = build_trace(ex, trace)
    return template.question_text(ex.question), cot + template.cot_suffix + template.answer_prefix + " " + ex.answer


def tokenize_sft(tok, rows: list[tuple[str, str]], max_tokens: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` (B, T) and ``labels`` (B, T) with -100 on prompt and padding.

    Raises:
        ValueError: a row longer than ``max_tokens`` or whose target has no token.
    """
    ids, labels = [], []
    for prompt, target in rows:
        p = tok(prompt)["input_ids"]
        t = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(p) + len(t) > max_tokens:
            raise ValueError(f"a row has {len(p) + len(t)} tokens > --max-tokens {max_tokens}: raise it or drop long rows")
        ids.append(p + t)
        labels.append([-100] * len(p) + t)
    T = max(len(r) for r in ids)
    out = {"input_ids": torch.full((len(ids), T), tok.pad_token_id), "attention_mask": torch.zeros((len(ids), T), dtype=torch.long), "labels": torch.full((len(ids), T), -100)}
    for i, (r, lab) in enumerate(zip(ids, labels)):
        out["input_ids"][i, : len(r)] = torch.tensor(r)
        out["attention_mask"][i, : len(r)] = 1
        out["labels"][i, : len(r)] = torch.tensor(lab)
    return out


class SFTModule(torch.nn.Module):
    """The causal LM as the engines train it: ``forward(batch, cfg, step) -> (loss, logs)``, with
    the checkpoint interface of :class:`kvkd.train.step.Trainee` (the trainable tensors by name)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict, cfg=None, step: int = 0):
        """Summed target-token CE (nats; a scalar tensor) and ``{"tokens": target tokens}``: the
        caller divides by the step's target tokens, so the loss does not depend on how a step's
        rows are split into micro-batches and ranks."""
        logits = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
        return loss, {"tokens": int((labels != -100).sum())}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors (LoRA adapters, or every weight without LoRA) by parameter name."""
        return {k: v.detach().cpu().contiguous().clone() for k, v in self.lm.named_parameters() if v.requires_grad}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a checkpoint's tensors into the model.

        Raises:
            KeyError: a tensor that is not a trainable parameter of this model (LoRA settings or model changed).
        """
        own = {k: v for k, v in self.lm.named_parameters() if v.requires_grad}
        copy_state(own, state, "this model's trainable parameters (were --model or the LoRA options changed?)")


@torch.no_grad()
def target_loss(lm, tok, examples: list[Example], mode: str, trace: str = "nl", batch_size: int = 8, max_tokens: int = 1024) -> float:
    """Mean target-token CE (nats/token) of ``lm`` on the rows' SFT targets (the trained quantity)."""
    module = SFTModule(lm).eval()
    device = next(lm.parameters()).device
    total = count = 0.0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in tokenize_sft(tok, [sft_texts(ex, mode, trace) for ex in examples[i : i + batch_size]], max_tokens).items()}
        loss, logs = module(batch)
        total += loss.item()
        count += logs["tokens"]
    return total / count


def absolute_paths(cfg: SFTConfig) -> SFTConfig:
    """Local paths (model, data, DeepSpeed config, run folder) made absolute, as ``kvkd train`` records them."""
    absolute = lambda s: str(Path(s).expanduser().resolve()) if _is_local(s) else s  # noqa: E731
    out = str(Path(cfg.out).expanduser().resolve()) if "://" not in cfg.out else cfg.out
    return dataclasses.replace(cfg, model=cfg.model if cfg.model == "smollm2" else absolute(cfg.model), data=absolute(cfg.data), deepspeed=absolute(cfg.deepspeed), out=out)


def _check_resume(fingerprint: str):
    def check(recorded: dict, cfg: SFTConfig) -> None:
        check_resume(recorded, cfg)
        if recorded.get("data_fingerprint", fingerprint) != fingerprint:
            raise RunFolderError(f"run folder {cfg.out} was trained on other rows (data fingerprint {recorded['data_fingerprint']} recorded, "
                                 f"{fingerprint} now: the file {cfg.data} changed?); use another --out, or pass --fresh to start this folder over")

    return check


def _load_trainable(cfg: SFTConfig):
    torch.manual_seed(cfg.seed)  # LoRA's initial weights
    loaded = load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    return SFTModule(make_trainable(loaded.model, cfg)), loaded  # LoRA (peft) or all weights


def _summary(cfg: SFTConfig, rundir: RunDir, rows: int, entries: list[dict], start: int, wall_s: float) -> SFTSummary:
    return SFTSummary(str(rundir.path), str(rundir.path / MODEL), cfg.mode, rows, max([e["step"] for e in entries] + [start]), cfg.batch_size * cfg.grad_accum,
                      entries[0]["loss"] if entries else float("nan"), entries[-1]["loss"] if entries else float("nan"), wall_s,
                      resumed_from=start, steps_run=max(0, cfg.steps - start))


def check_sft_options(cfg: SFTConfig) -> None:
    """The checks of ``kvkd sft``'s options that need no data or model (``kvkd sweep`` runs them
    for its SFT cells before any cell starts).

    Raises:
        ValueError: no ``--out`` or ``--data``; ``--steps``, ``--batch-size`` or ``--grad-accum`` < 1;
            ``--deepspeed`` without its file or without a launcher.
    """
    if not cfg.out:
        raise ValueError("no run folder given: pass --out RUN_DIR")
    if not cfg.data:
        raise ValueError("no data given: pass --data (a data set, or a kvkd generate trace file)")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ValueError("--steps, --batch-size and --grad-accum must be >= 1")
    check_deepspeed_launch(cfg)


def sft(cfg: SFTConfig, on_step: Callable[[SFTStep], None] | None = None) -> SFTSummary:
    """Fine-tune ``cfg.model`` on the rows' SFT targets and export it to ``OUT/model``; a run
    folder with checkpoints resumes from the newest (module docstring). With ``cfg.deepspeed``
    every rank runs this (launched by ``torchrun``/``deepspeed``); rank 0 alone writes the run
    folder and calls ``on_step`` (the loss is the mean over the global batch).

    Returns:
        SFTSummary (first and last step's target-token CE, over the whole log).
    Raises:
        ValueError: bad options, a row too long, a ZeRO-3 config, a checkpoint of the other engine;
        kvkd.train.rundir.RunFolderError: the folder is locked by another process, holds a run
            with other options or rows (names both values), or a write failed;
        kvkd.train.rundir.NonFiniteError: a NaN/inf loss or gradient (the run stops);
        kvkd.data.DataError: unreadable data; kvkd.models.ModelLoadError.
    """
    check_sft_options(cfg)
    cfg = absolute_paths(cfg)
    examples = load_examples(cfg.data, split=cfg.split, fmt=cfg.data_format, offset=cfg.offset or 0, limit=cfg.limit).examples
    if not examples:
        raise ValueError(f"{cfg.data}: no rows selected")
    texts = [sft_texts(ex, cfg.mode, cfg.trace) for ex in examples]  # fails early on a row without a trace
    fingerprint = dataset_fingerprint(examples)
    rundir, lead, t0 = RunDir(cfg.out), _rank() == 0, time.perf_counter()
    with rundir.lock() if lead else contextlib.nullcontext():
        recorded, done = resume_point(rundir, cfg, lead, _check_resume(fingerprint))
        if done >= cfg.steps:  # finished: report it (and export it again if a kill interrupted the export)
            if lead and not (rundir.path / MODEL).is_dir():
                module, loaded = _load_trainable(cfg)
                module.load_checkpoint_state(load_file(str(rundir.latest_checkpoint() / WEIGHTS)))
                export_model(module.lm, loaded.tokenizer, rundir.path / MODEL)
            entries = rundir.read_log() if lead else []
            summary = _summary(cfg, rundir, len(examples), entries, done, time.perf_counter() - t0)
            if lead:
                rundir.write_summary(summary)
            return summary
        module, loaded = _load_trainable(cfg)
        tok = loaded.tokenizer
        engine = build_engine(module, cfg)
        if engine.info.zero_stage == 3:
            raise ValueError(f"--deepspeed {cfg.deepspeed}: kvkd sft runs ZeRO stage 1 or 2 (stage 3 partitions the weights it exports); use kvkd/configs/ds_zero2.json")
        check_batches_split(len(examples), cfg.batch_size, engine.world_size)
        if engine.world_size > 1 and cfg.grad_accum > 1:  # the last micro-batch of an epoch must split over the ranks too
            check_batches_split(len(examples) % (cfg.batch_size * cfg.grad_accum) or cfg.batch_size, cfg.batch_size, engine.world_size)
        if lead:
            rundir.write_config(_record(cfg, loaded, engine, len(examples), fingerprint, recorded, done))
        engine.barrier()
        ckpt = rundir.latest_checkpoint()
        start = engine.load(ckpt) if ckpt is not None else 0
        entries = rundir.truncate_log(start) if lead else []  # the steps the checkpoint covers; later ones are redone
        engine.module.train()
        steps = _batches(len(examples), cfg.batch_size * cfg.grad_accum, cfg.seed, start, cfg.steps)
        targets = [len(tok(target, add_special_tokens=False)["input_ids"]) + 1 for _, target in texts]  # target tokens per row (+ EOS)
        with rundir.log_writer() if lead else contextlib.nullcontext(lambda entry: None) as write:
            for step, rows in zip(range(start, cfg.steps), steps):
                torch.manual_seed(cfg.seed * 100003 + step)  # dropout reproducible on resume
                t, lr, summed = time.perf_counter(), engine.lr(), 0.0
                # the step's loss is its summed target-token CE over all its target tokens; each rank's share is scaled
                # by the world size because the engines average the ranks' gradients
                scale = engine.world_size / sum(targets[i] for i in rows)
                shares = micro_batches(rows, cfg.batch_size, engine.rank, engine.world_size)
                for k, (part, _) in enumerate(shares):
                    batch = {key: v.to(engine.device) for key, v in tokenize_sft(tok, [texts[i] for i in part], cfg.max_tokens).items()}
                    with engine.autocast():
                        value, _ = engine(batch, cfg, step)
                    if not engine.all_finite(value) or not engine.backward_step(value * scale, step=k == len(shares) - 1):
                        raise NonFiniteError(f"step {step + 1}: non-finite (NaN/inf) loss or gradient (lr {lr:.3g}): the run diverged; the newest checkpoint is "
                                             f"step {rundir.steps_done()}. Lower --lr (or raise --warmup-steps) and start over with --fresh")
                    summed += float(value.detach()) * scale
                loss = float(engine.all_mean(torch.tensor([summed], dtype=torch.float64), 1.0)[0])  # mean over ranks = the step's token mean
                entry = SFTStep(step + 1, loss, lr, time.perf_counter() - t)
                if lead:
                    write(asdict(entry))
                    entries.append(asdict(entry))
                    if on_step and (entry.step % cfg.log_every == 0 or entry.step == cfg.steps):
                        on_step(entry)
                if cfg.save_every and entry.step % cfg.save_every == 0 and entry.step < cfg.steps:
                    engine.save(rundir.path, entry.step, cfg.keep_checkpoints)
        engine.save(rundir.path, cfg.steps, cfg.keep_checkpoints)
        summary = _summary(cfg, rundir, len(examples), entries, start, time.perf_counter() - t0)
        if lead:
            export_model(engine.module.lm, tok, rundir.path / MODEL)
            rundir.write_summary(summary)
        engine.barrier()
        return summary


def _record(cfg: SFTConfig, loaded, engine, rows: int, fingerprint: str, recorded: dict | None, done: int) -> dict:
    """``config.json``: the options, what the run derived (rows, their fingerprint, effective batch,
    engine) and provenance (a resume appends its own to ``resumes``)."""
    resolved = asdict(cfg)
    resolved.pop("fresh")
    resolved.update(effective_batch=cfg.batch_size * cfg.grad_accum, teacher=loaded.info, rows=rows, data_fingerprint=fingerprint, engine=asdict(engine.info))
    record_provenance(resolved, recorded, done, cfg.steps, engine.device)
    return json.loads(json.dumps(resolved, default=str))


def export_model(lm, tok, out: Path) -> Path:
    """Save ``lm`` (LoRA merged into the weights) and its tokenizer as a Hugging Face folder,
    written beside ``out`` and renamed into place (a kill leaves no half folder at ``out``).

    Raises:
        kvkd.train.rundir.RunFolderError: a write failed (e.g. disk full).
    """
    out = Path(out)
    if hasattr(lm, "merge_and_unload"):
        lm = lm.merge_and_unload()  # the run ends here: merging in place is fine
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        make_readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(out, err) from None
    return out
