"""``kvkd eval``: decode, extract the final answer, score it.

Modes:
- ``latent``: a trained run folder (or, with ``untrained=True``, a fresh latent student
  built from ``model``): ``Q <bot> z_1..z_M <eot> The answer is:`` then greedy tokens.
- ``nocot``: a plain model answering directly after ``Q\\nThe answer is:``.
- ``cot``: a plain model writing its reasoning after ``Q\\n``; the last number is taken.

Reports accuracy with its sample size and 95% Wilson interval, and the mean NLL of the gold
answer (nats/token; teacher-forced, after the same prefix), which moves long before
accuracy does on small models and short runs. Per-example predictions go to a JSONL file.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from kvkd.config import DataSelection, RuntimeArgs, opt, override
from kvkd.data import Example, load_examples
from kvkd.models import resolve_device
from kvkd.eval.answers import answers_match, extract_answer, extract_boxed, wilson_interval
from kvkd.prompts import PromptTemplate, token_span
from kvkd.train.loader import collate, tokenize_student

MODES = ("latent", "nocot", "cot")


@dataclass
class EvalConfig(DataSelection, RuntimeArgs):
    """Options of ``kvkd eval`` (besides the data selection and runtime groups).

    Attributes:
        run: a ``kvkd train`` run folder or a ``kvkd export`` folder (latent mode).
        model: a plain model spec (``nocot``/``cot`` baselines, or ``untrained`` latent student).
        mode: ``latent``, ``nocot`` or ``cot``.
        untrained: latent mode with a fresh (untrained) student built from ``model``.
        latents: M for an untrained latent student.
        batch_size: examples per decoding batch.
        max_new_tokens: generated tokens at most (answer modes); cot_max_new_tokens for ``cot``.
        answer_check: ``numeric`` (GSM8K-style) or ``math`` (math-verify, for MATH500).
        out: predictions JSONL path ("" = ``predictions.jsonl`` in the run folder or cwd).
        seed: RNG seed (the untrained student's projection init).
    """

    offset: int | None = override(DataSelection, "offset", 0, "")
    run: str = opt("", help="A kvkd train run folder or a kvkd export folder (latent mode)")
    model: str = opt("", help="A plain model (smollm2, .gguf, folder, hub id) for the nocot/cot baselines or --untrained")
    mode: str = opt("latent", help="latent, nocot or cot", choices=MODES)
    untrained: bool = opt(False, cli="untrained/no-untrained", help="Latent mode with a fresh, untrained latent student built from --model")
    latents: int = opt(6, help="M latent thoughts for --untrained")
    batch_size: int = opt(8, help="Examples per decoding batch")
    max_new_tokens: int = opt(12, help="Generated tokens at most (the answer)")
    cot_max_new_tokens: int = opt(200, help="Generated tokens at most in cot mode (reasoning and answer)")
    answer_check: str = opt("numeric", help="numeric (GSM8K-style) or math (math-verify, MATH500)", choices=("numeric", "math"))
    out: str = opt("", help="Per-example predictions JSONL", default_text="RUN/predictions.jsonl or ./predictions.jsonl")
    seed: int = opt(0, help="Random seed (the untrained student's projection init)")


@dataclass
class EvalResult:
    """Scores of one evaluation."""

    name: str
    mode: str
    data: str
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    mean_answer_nll: float
    wall_s: float
    predictions: str


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def _latent_predictions(student, examples: list[Example], cfg: EvalConfig, on_progress) -> tuple[list[str], list[float]]:
    tok = student.tokenizer
    template = student.template
    device = next(student.parameters()).device
    prompt_ids = torch.tensor(tok(template.answer_prefix, add_special_tokens=False)["input_ids"], device=device)
    texts, nlls = [], []
    for chunk in _batches(examples, cfg.batch_size):
        items = []
        for ex in chunk:
            st = tokenize_student(tok, ex, template)
            items.append({"index": 0, "q_ids": st.q_ids, "s_ids": st.s_ids, "answer_start": st.answer_start, "teachers": []})
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(items, tok.pad_token_id).items()}
        out = student(batch["q_ids"], batch["q_mask"], batch["s_ids"], batch["s_mask"], batch["answer_start"])
        nlls.extend(out.answer_nll.tolist())
        gen = student.generate(batch["q_ids"], batch["q_mask"], prompt_ids, cfg.max_new_tokens)
        texts.extend(template.answer_prefix + tok.decode(g, skip_special_tokens=True) for g in gen)
        if on_progress:
            on_progress(len(texts), len(examples))
    return texts, nlls


@torch.no_grad()
def _text_predictions(loaded, examples: list[Example], cfg: EvalConfig, on_progress) -> tuple[list[str], list[float]]:
    model, tok = loaded.model, loaded.tokenizer
    template = PromptTemplate()
    tok.padding_side = "left"
    texts, nlls = [], []
    for chunk in _batches(examples, cfg.batch_size):
        if cfg.mode == "cot":
            prompts = [template.question_text(ex.question) for ex in chunk]
            max_new = cfg.cot_max_new_tokens
        else:
            prompts = [template.question_text(ex.question) + template.answer_prefix for ex in chunk]
            max_new = cfg.max_new_tokens
        enc = tok(prompts, return_tensors="pt", padding=True).to(model.device)
        gen = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        for row, prompt in zip(gen[:, enc["input_ids"].shape[1] :], prompts):
            text = tok.decode(row, skip_special_tokens=True)
            texts.append((template.answer_prefix if cfg.mode == "nocot" else "") + (text.split("\n")[0] if cfg.mode == "nocot" else text))
        for ex in chunk:  # gold-answer NLL after "Q\nThe answer is: ", answer tokens found by offsets
            text, (a_start, a_end) = template.answer_text(ex.answer)
            head = template.question_text(ex.question)
            enc = tok(head + text, return_offsets_mapping=True)
            first, stop = token_span(enc["offset_mapping"], (len(head) + a_start, len(head) + a_end))
            ids = torch.tensor([enc["input_ids"]], device=model.device)
            logits = model(input_ids=ids).logits[0, first - 1 : stop - 1].float()
            nlls.append(float(torch.nn.functional.cross_entropy(logits, ids[0, first:stop])))
        if on_progress:
            on_progress(len(texts), len(examples))
    return texts, nlls


def evaluate(cfg: EvalConfig, on_progress: Callable[[int, int], None] | None = None, student=None) -> EvalResult:
    """Evaluate a run folder or a plain model on a data set.

    Args:
        cfg: the options (see EvalConfig).
        on_progress: called with (done, total) after every batch.
        student: an already built LatentStudent (skips loading; tests, demo).
    Raises:
        ValueError: bad mode/options; FileNotFoundError: run folder without checkpoint.
    """
    if cfg.mode not in MODES:
        raise ValueError(f"unknown eval mode {cfg.mode!r}; choose one of {MODES}")
    examples = load_examples(cfg.data, split=cfg.split, fmt=cfg.data_format, offset=cfg.offset, limit=cfg.limit).examples
    t0 = time.perf_counter()
    if cfg.mode == "latent":
        name = cfg.run or f"{cfg.model} (untrained latent)"
        if student is None:
            if cfg.run:
                from kvkd.train.export import is_export, load_export
                from kvkd.train.trainer import load_run

                # remote code only when this command was given --trust-remote-code, never from the folder's record
                student, _ = (load_export if is_export(cfg.run) else load_run)(cfg.run, trust_remote_code=cfg.trust_remote_code)
            elif cfg.untrained and cfg.model:
                from kvkd.train.trainer import TrainConfig, build_student

                torch.manual_seed(cfg.seed)
                student = build_student(cfg.model, cfg.latents, TrainConfig(use_lora=False))
                student.eval()
            else:
                raise ValueError("latent mode needs --run RUN_DIR, or --model SPEC with --untrained")
            student.to(resolve_device(cfg.device))
        texts, nlls = _latent_predictions(student, examples, cfg, on_progress)
    else:
        if not cfg.model:
            raise ValueError(f"{cfg.mode} mode needs --model SPEC")
        from kvkd.models import load_model

        name = f"{cfg.model} ({cfg.mode})"
        loaded = load_model(cfg.model)
        loaded.model.to(resolve_device(cfg.device))
        texts, nlls = _text_predictions(loaded, examples, cfg, on_progress)
    out = Path(cfg.out or (Path(cfg.run) / "predictions.jsonl" if cfg.run else "predictions.jsonl"))
    out.parent.mkdir(parents=True, exist_ok=True)
    correct = 0
    with open(out, "w") as fh:
        for ex, text, nll in zip(examples, texts, nlls):
            pred = extract_answer(text)
            # math mode compares LaTeX (\boxed{p - q}), which extract_answer's numbers would lose
            ok = answers_match(pred if cfg.answer_check == "numeric" else (extract_boxed(text) or text), ex.answer, mode=cfg.answer_check)
            correct += ok
            fh.write(json.dumps({"id": ex.id, "gold": ex.answer, "prediction": pred, "correct": ok, "output": text, "answer_nll": nll}) + "\n")
    n = len(examples)
    lo, hi = wilson_interval(correct, n)
    return EvalResult(
        name=name,
        mode=cfg.mode,
        data=cfg.data,
        n=n,
        correct=correct,
        accuracy=correct / n if n else 0.0,
        ci_low=lo,
        ci_high=hi,
        mean_answer_nll=sum(nlls) / n if n else float("nan"),
        wall_s=time.perf_counter() - t0,
        predictions=str(out),
    )


def result_json(result: EvalResult) -> dict:
    return asdict(result)
