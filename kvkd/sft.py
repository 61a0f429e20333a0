"""``kvkd sft``: supervised fine-tuning of a teacher or baseline on (question, trace, answer) text.

Modes (the text layouts of ``kvkd eval``'s plain-model modes, so an SFT model is evaluated the
way it was trained):

- ``cot`` (CoT-SFT, the usual teacher): prompt ``{question}\\n``, target
  ``{trace}\\nThe answer is: {answer}<eos>``.
- ``nocot`` (No-CoT-SFT baseline of KaVa's table): prompt ``{question}\\nThe answer is:``,
  target `` {answer}<eos>``.

The loss is the mean cross-entropy over target tokens only (prompt and padding are masked,
labels -100). The data is any ``--data`` kvkd reads; a trace file of ``kvkd generate``
(``--format trace``, detected) trains on the teacher's own kept traces. The trace of a data
set row is its whole gold CoT (``--trace nl|equations``; no step is dropped).

kvkd's own loop on kvkd's plain engine (:class:`kvkd.train.engines.PlainEngine`: AdamW, linear
warm-up/decay, clipping, ``--grad-accum``) rather than TRL's ``SFTTrainer``: the options, the
seeded batch order and the run folder stay those of ``kvkd train``, and no second training
stack is needed. The run folder holds ``config.json``, ``log.jsonl``, ``summary.json`` and
``model/``: a normal Hugging Face folder (LoRA merged) that ``kvkd generate``, ``kvkd extract``
and ``kvkd eval`` take as ``--model``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from kvkd.config import DataSelection, RuntimeArgs, opt, override
from kvkd.data import TRACE_KINDS, Example, build_trace, load_examples
from kvkd.models import load_model, resolve_device
from kvkd.prompts import PromptTemplate
from kvkd.train.engines import PlainEngine
from kvkd.train.options import LoraArgs, OptimArgs
from kvkd.train.student import make_trainable
from kvkd.train.trainer import _batches, micro_batches

SFT_MODES = ("cot", "nocot")


@dataclass
class SFTConfig(DataSelection, OptimArgs, LoraArgs, RuntimeArgs):
    """Options of ``kvkd sft`` (besides the data, optimiser, LoRA and runtime groups).

    Attributes:
        model: the model to fine-tune (``smollm2``, a .gguf, a folder, a hub id).
        out: run folder (config, log, summary, ``model/``).
        mode: ``cot`` or ``nocot`` (see the module docstring).
        trace: a data set row's trace (``nl`` or ``equations``); a trace file's rows carry theirs.
        dtype: dtype of the weights while training.
        max_tokens: rows longer than this (prompt + target tokens) are refused.
        overwrite: replace an existing run folder.
    """

    offset: int | None = override(DataSelection, "offset", 0, "")
    model: str = opt("smollm2", help="Model to fine-tune: smollm2 (packaged GGUF), a .gguf, a model folder or a hub id")
    out: str = opt("", help="Run folder: config.json, log.jsonl, summary.json and model/ (a Hugging Face folder)")
    mode: str = opt("cot", help="cot (CoT-SFT: reasoning then answer) or nocot (No-CoT-SFT: the answer only)", choices=SFT_MODES)
    trace: str = opt("nl", help="A data set row's CoT: nl or equations (trace files carry their own)", choices=TRACE_KINDS)
    dtype: str = opt("float32", help="Training dtype: float32, bfloat16 or float16", choices=("float32", "bfloat16", "float16"))
    max_tokens: int = opt(1024, help="Longest row (prompt + target tokens); longer rows are an error")
    overwrite: bool = opt(False, cli="overwrite/no-overwrite", help="Replace an existing run folder")


@dataclass
class SFTStep:
    """One optimiser step as logged: step, target-token CE (nats/token), learning rate, seconds."""

    step: int
    loss: float
    lr: float
    step_s: float


@dataclass
class SFTSummary:
    run_dir: str
    model_dir: str
    mode: str
    rows: int
    steps: int
    effective_batch: int
    first_loss: float
    final_loss: float
    wall_s: float


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
    """The causal LM as the engine trains it: ``forward(batch, cfg, step) -> (loss, logs)``."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict, cfg=None, step: int = 0):
        logits = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return loss, {"loss": float(loss.detach())}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.lm.named_parameters() if v.requires_grad}


@torch.no_grad()
def target_loss(lm, tok, examples: list[Example], mode: str, trace: str = "nl", batch_size: int = 8, max_tokens: int = 1024) -> float:
    """Mean target-token CE (nats/token) of ``lm`` on the rows' SFT targets (the trained quantity)."""
    module = SFTModule(lm).eval()
    device = next(lm.parameters()).device
    total = count = 0.0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in tokenize_sft(tok, [sft_texts(ex, mode, trace) for ex in examples[i : i + batch_size]], max_tokens).items()}
        n = float((batch["labels"][:, 1:] != -100).sum())
        total += module(batch)[0].item() * n
        count += n
    return total / count


def sft(cfg: SFTConfig, on_step: Callable[[SFTStep], None] | None = None) -> SFTSummary:
    """Fine-tune ``cfg.model`` on the rows' SFT targets and export it to ``OUT/model``.

    Returns:
        SFTSummary (first and last step's target-token CE).
    Raises:
        ValueError: bad options, an existing run folder without ``overwrite``, a row too long;
        kvkd.data.DataError: unreadable data; kvkd.models.ModelLoadError.
    """
    if not cfg.out:
        raise ValueError("no run folder given: pass --out RUN_DIR")
    if not cfg.data:
        raise ValueError("no data given: pass --data (a data set, or a kvkd generate trace file)")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ValueError("--steps, --batch-size and --grad-accum must be >= 1")
    run = Path(cfg.out)
    if (run / "config.json").exists() and not cfg.overwrite:
        raise ValueError(f"{run} already holds a run: pass --overwrite to replace it, or another --out")
    examples = load_examples(cfg.data, split=cfg.split, fmt=cfg.data_format, offset=cfg.offset or 0, limit=cfg.limit).examples
    if not examples:
        raise ValueError(f"{cfg.data}: no rows selected")
    texts = [sft_texts(ex, cfg.mode, cfg.trace) for ex in examples]  # fails early on a row without a trace
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    lm, tok = loaded.model, loaded.tokenizer
    lm = make_trainable(lm, cfg)  # LoRA (peft) or all weights
    engine = PlainEngine(SFTModule(lm), cfg, resolve_device(cfg.device))
    engine.module.train()
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({**asdict(cfg), "effective_batch": cfg.batch_size * cfg.grad_accum, "teacher": loaded.info, "rows": len(examples)}, indent=2, default=str))
    t0 = time.perf_counter()
    first = last = float("nan")
    with open(run / "log.jsonl", "w") as log:
        for step, rows in zip(range(cfg.steps), _batches(len(examples), cfg.batch_size * cfg.grad_accum, cfg.seed, 0, cfg.steps)):
            torch.manual_seed(cfg.seed * 100003 + step)
            t = time.perf_counter()
            lr, loss = engine.lr(), 0.0
            shares = micro_batches(rows, cfg.batch_size, 0, 1)
            for k, (part, scale) in enumerate(shares):
                batch = {key: v.to(engine.device) for key, v in tokenize_sft(tok, [texts[i] for i in part], cfg.max_tokens).items()}
                value, logs = engine(batch, cfg, step)
                engine.backward_step(value * scale, step=k == len(shares) - 1)
                loss += logs["loss"] * scale
            entry = SFTStep(step + 1, loss, lr, time.perf_counter() - t)
            first = loss if step == 0 else first
            last = loss
            log.write(json.dumps(asdict(entry)) + "\n")
            if on_step:
                on_step(entry)
    model_dir = export_model(engine.module.lm, tok, run / "model")
    summary = SFTSummary(str(run), str(model_dir), cfg.mode, len(examples), cfg.steps, cfg.batch_size * cfg.grad_accum, first, last, time.perf_counter() - t0)
    (run / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary


def export_model(lm, tok, out: Path) -> Path:
    """Save ``lm`` (LoRA merged into the weights) and its tokenizer as a Hugging Face folder."""
    if hasattr(lm, "merge_and_unload"):
        lm = lm.merge_and_unload()
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    return out
