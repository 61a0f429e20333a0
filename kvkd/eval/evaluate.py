"""``kvkd eval``: decode, extract the final answer, score it, write the results.

Modes:
- ``latent``: a trained run folder (or, with ``untrained=True``, a fresh latent student
  built from ``model``): ``Q <bot> z_1..z_M <eot> The answer is:`` then greedy tokens.
- ``nocot``: a plain model answering directly after ``Q\\nThe answer is:``.
- ``cot``: a plain model writing its reasoning after ``Q\\n``; the last number is taken.

Reports accuracy with its sample size and 95% Wilson interval, and the mean NLL of the gold
answer (nats/token; teacher-forced, after the same prefix), which moves long before
accuracy does on small models and short runs.

Before anything is loaded or generated, the answer check is fixed (``auto``: math-verify for
a MATH-like set or gold answers the numeric check cannot represent, else numeric) and
checked against every gold answer, the output folder is created and tested for writing, and
(for a run) the eval questions are compared with the run's training rows.

Each evaluation writes its own folder (never another's)::

    RUN/evals/DATASET-SPLIT[-rowsA-B][-MODE][-N]/   (./evals/... without a run; or --out)
        metrics.json       accuracy, n, interval, NLL, data fingerprint, run, mode, versions
        predictions.jsonl  one line per row: id, gold, prediction, correct, status, output, NLL

``predictions.jsonl`` and then ``metrics.json`` are written whole (a temporary file renamed),
so a folder with a ``metrics.json`` holds a finished evaluation.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from kvkd.config import DataSelection, RuntimeArgs, opt, override
from kvkd.data import Example, LoadResult, dataset_fingerprint, load_examples
from kvkd.models import resolve_device
from kvkd.eval.answers import check_gold_answers, parse_answer, score_answer, wilson_interval
from kvkd.prompts import PromptTemplate, token_span
from kvkd.train.loader import collate, tokenize_student

MODES = ("latent", "nocot", "cot")
ANSWER_CHECKS = ("auto", "numeric", "math")
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
_SPLIT_STEMS = ("train", "test", "valid", "validation", "dev", "eval")


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
        answer_check: ``auto`` (math for MATH-like sets, with ``\\boxed{}`` solutions, or
            gold answers that are not numbers, fractions, ratios or times; else numeric),
            ``numeric`` or ``math``.
        out: this evaluation's folder ("" = a new ``RUN/evals/DATASET-SPLIT...`` or
            ``./evals/...``); a folder that already holds a ``metrics.json`` is refused.
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
    answer_check: str = opt("auto", help="auto (math for MATH-like sets or non-numeric gold answers, else numeric), "
                            "numeric (numbers, fractions, ratios, times by value) or math (math-verify)", choices=ANSWER_CHECKS)
    out: str = opt("", help="Folder of this eval (metrics.json, predictions.jsonl); one holding metrics.json is refused",
                   default_text="a new RUN/evals/DATASET-SPLIT folder (./evals/... without --run)")
    seed: int = opt(0, help="Random seed (the untrained student's projection init)")


@dataclass
class EvalResult:
    """Scores of one evaluation (``metrics.json`` holds them too).

    Attributes:
        name: the method evaluated; mode: latent/nocot/cot; answer_check: numeric or math.
        data, split, fingerprint: the data source, its split and
            :func:`kvkd.data.dataset_fingerprint` of the rows evaluated.
        n, correct, accuracy: rows scored, correct ones, their ratio.
        ci_low, ci_high: 95% Wilson interval of the accuracy.
        mean_answer_nll: mean gold-answer NLL, nats/token.
        no_answer: rows whose output held no answer; unparsed: rows (math) that math-verify
            could not read, compared as normalised strings.
        gold_kinds: rows per gold answer kind (:data:`kvkd.eval.answers.ANSWER_KINDS`).
        warnings: e.g. eval questions found among the run's training rows.
        folder, predictions, metrics: the eval folder and its two files.
    """

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
    answer_check: str = "numeric"
    split: str | None = None
    fingerprint: str = ""
    no_answer: int = 0
    unparsed: int = 0
    gold_kinds: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    folder: str = ""
    metrics: str = ""


def versions() -> dict[str, str]:
    """Installed versions of kvkd and the libraries its results depend on (no imports)."""
    from importlib import metadata

    import kvkd

    out = {"kvkd": kvkd.__version__}
    for name in ("torch", "transformers", "peft", "math-verify"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def choose_answer_check(requested: str, data: LoadResult) -> str:
    """The answer check of an evaluation: ``requested`` unless ``auto``, which picks ``math``
    for a MATH-like set (format ``math``, or a solution with ``\\boxed{}``) or when a gold
    answer is not a number, fraction, ratio or time (numeric could not score it), else
    ``numeric``.

    Raises:
        ValueError: an unknown check.
    """
    if requested not in ANSWER_CHECKS:
        raise ValueError(f"unknown --answer-check {requested!r}; choose one of {ANSWER_CHECKS}")
    if requested != "auto":
        return requested
    if data.fmt == "math" or any(parse_answer(ex.answer).kind == "other" or "\\boxed" in ex.cot for ex in data.examples):
        return "math"
    return "numeric"


def _dataset_name(data: LoadResult, split: str | None) -> str:
    """``gsm8k-test`` for ``.../gsm8k/test.jsonl``, ``.../gsm8k`` with split test, or
    ``openai/gsm8k`` split test; a file with another stem gives its stem."""
    if data.fmt == "hf":
        return data.source.partition(":")[0].rsplit("/", 1)[-1] + f"-{split}"
    path = Path(data.source)
    name = f"{path.parent.name}-{path.stem}" if path.stem in _SPLIT_STEMS and path.parent.name else path.stem
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def new_folder(root: str | Path, name: str) -> Path:
    """Create and return ``root/name``, or ``root/name-2``, ``-3``, ... if taken (never an
    existing folder, even when two evaluations start at once).

    Raises:
        OSError: ``root`` cannot be created or written.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    k = 1
    while True:
        folder = root / (name if k == 1 else f"{name}-{k}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            k += 1


def eval_folder(cfg: EvalConfig, data: LoadResult) -> Path:
    """Create (or, for ``--out``, take) this evaluation's folder and check it can be written.

    The default is a new folder under ``RUN/evals`` (``./evals`` without a run) named after
    the data set, split, row window and mode, with ``-2``, ``-3``, ... added when taken.

    Raises:
        ValueError: ``--out`` names a ``.jsonl``/``.json`` file instead of a folder.
        FileExistsError: ``--out`` already holds a finished evaluation (``metrics.json``).
        PermissionError: the folder cannot be created or written (names it and ``--out``).
    """
    try:
        if cfg.out:
            folder = Path(cfg.out)
            if folder.suffix in (".jsonl", ".json"):
                raise ValueError(f"--out {folder}: give a folder (it receives {METRICS_FILE} and {PREDICTIONS_FILE}), not a file name")
            if (folder / METRICS_FILE).exists():
                raise FileExistsError(f"--out {folder} already holds a finished evaluation ({METRICS_FILE}); "
                                      "choose another --out, or leave it out for a new folder")
            folder.mkdir(parents=True, exist_ok=True)
            folder = folder.resolve()
        else:
            root = Path(cfg.run) / "evals" if cfg.run else Path("evals")
            name = _dataset_name(data, cfg.split)
            if cfg.offset or cfg.limit is not None:
                start = cfg.offset or 0
                name += f"-rows{start}-{start + len(data.examples)}"
            if cfg.mode != "latent":
                name += f"-{cfg.mode}"
            elif cfg.untrained:
                name += "-untrained"
            folder = new_folder(root.resolve(), name)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except (PermissionError, OSError) as err:
        if isinstance(err, FileExistsError) and cfg.out:
            raise
        where = cfg.out or (Path(cfg.run) / "evals" if cfg.run else Path("evals").resolve())
        raise PermissionError(f"cannot write the eval folder {where} ({err.strerror or err}); "
                              "pass --out FOLDER somewhere writable") from None
    return folder


def _write_whole(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a reader sees all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _latent_batch(student, chunk: list[Example]) -> dict:
    device = next(student.parameters()).device
    items = []
    for ex in chunk:
        st = tokenize_student(student.tokenizer, ex, student.template)
        items.append({"index": 0, "q_ids": st.q_ids, "s_ids": st.s_ids, "answer_start": st.answer_start, "teachers": []})
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(items, student.tokenizer.pad_token_id).items()}


@torch.no_grad()
def _latent_predictions(student, examples: list[Example], batch_size: int, max_new_tokens: int | None, on_progress=None) -> tuple[list[str], list[float]]:
    """Gold-answer NLLs (nats/token) and, unless ``max_new_tokens`` is None, the greedy
    outputs (``The answer is:`` + generated text) of a latent student."""
    tok, template = student.tokenizer, student.template
    device = next(student.parameters()).device
    prompt_ids = torch.tensor(tok(template.answer_prefix, add_special_tokens=False)["input_ids"], device=device)
    texts, nlls = [], []
    for chunk in _batches(examples, batch_size):
        batch = _latent_batch(student, chunk)
        out = student(batch["q_ids"], batch["q_mask"], batch["s_ids"], batch["s_mask"], batch["answer_start"])
        nlls.extend(out.answer_nll.tolist())
        if max_new_tokens is not None:
            gen = student.generate(batch["q_ids"], batch["q_mask"], prompt_ids, max_new_tokens)
            texts.extend(template.answer_prefix + tok.decode(g, skip_special_tokens=True) for g in gen)
        if on_progress:
            on_progress(len(nlls), len(examples))
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


def _check_run_folder(run: str) -> None:
    from kvkd.train.export import is_export

    if not (Path(run) / "config.json").is_file() and not is_export(run):
        raise FileNotFoundError(f"--run {run}: not a kvkd train run folder (no config.json) nor a kvkd export folder")


def _contamination_warnings(run: str, examples: list[Example]) -> list[str]:
    """Warnings when eval questions are among the run's training rows (or cannot be checked)."""
    from kvkd.data import DataError
    from kvkd.eval.overlap import find_overlap, run_training_examples

    try:
        found = find_overlap(run_training_examples(run), examples)
    except (FileNotFoundError, DataError, ValueError, KeyError) as err:
        return [f"could not compare the eval rows with the run's training rows: {err}"]
    if not found:
        return []
    return [f"contamination: {found.describe('eval questions', 'the training rows of ' + run)}; their scores do not measure generalisation"]


def evaluate(cfg: EvalConfig, on_progress: Callable[[int, int], None] | None = None, student=None,
             on_warning: Callable[[str], None] | None = None) -> EvalResult:
    """Evaluate a run folder or a plain model on a data set; write its own eval folder.

    Everything that can fail on the input fails before a model is loaded: the data, the
    answer check against every gold answer, the run folder, the output folder's writability.

    Args:
        cfg: the options (see EvalConfig).
        on_progress: called with (done, total) after every batch.
        student: an already built LatentStudent (skips loading; tests, demo).
        on_warning: called with each warning as soon as it is known (they are also in the
            result and metrics.json), e.g. eval questions among the run's training rows.
    Returns:
        :class:`EvalResult`; ``folder`` holds ``metrics.json`` and ``predictions.jsonl``.
    Raises:
        ValueError: bad mode/options. DataError: unreadable data, or (numeric check) gold
        answers it cannot represent, naming the rows. FileNotFoundError: no run folder or no
        checkpoint. FileExistsError / PermissionError: see :func:`eval_folder`.
    """
    if cfg.mode not in MODES:
        raise ValueError(f"unknown eval mode {cfg.mode!r}; choose one of {MODES}")
    if cfg.mode == "latent" and not cfg.run and not (cfg.untrained and cfg.model) and student is None:
        raise ValueError("latent mode needs --run RUN_DIR, or --model SPEC with --untrained")
    if cfg.mode != "latent" and not cfg.model:
        raise ValueError(f"{cfg.mode} mode needs --model SPEC")
    if cfg.mode == "latent" and cfg.run and student is None:
        _check_run_folder(cfg.run)
    data = load_examples(cfg.data, split=cfg.split, fmt=cfg.data_format, offset=cfg.offset, limit=cfg.limit)
    examples = data.examples
    check = choose_answer_check(cfg.answer_check, data)
    gold_kinds = check_gold_answers(((ex.id, ex.answer) for ex in examples), check, f"--data {cfg.data}")
    fresh = not cfg.out or not Path(cfg.out).exists()
    folder = eval_folder(cfg, data)
    try:
        return _run_eval(cfg, data, check, gold_kinds, folder, student, on_progress, on_warning)
    except BaseException:
        if fresh:  # a failed eval leaves no empty folder behind (one with files is kept, for a look)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _run_eval(cfg: EvalConfig, data: LoadResult, check: str, gold_kinds: dict, folder: Path, student, on_progress, on_warning) -> EvalResult:
    """The part of :func:`evaluate` after every input check: load, generate, score, write."""
    examples = data.examples
    warnings = _contamination_warnings(cfg.run, examples) if cfg.mode == "latent" and cfg.run else []
    for w in warnings:
        if on_warning:
            on_warning(w)
    t0 = time.perf_counter()
    if cfg.mode == "latent":
        name = cfg.run or f"{cfg.model} (untrained latent)"
        if student is None:
            if cfg.run:
                from kvkd.train.export import is_export, load_export
                from kvkd.train.trainer import load_run

                # remote code only when this command was given --trust-remote-code, never from the folder's record
                student, _ = (load_export if is_export(cfg.run) else load_run)(cfg.run, trust_remote_code=cfg.trust_remote_code)
            else:  # --untrained --model (checked before anything loads)
                from kvkd.train.trainer import TrainConfig, build_student

                torch.manual_seed(cfg.seed)
                student = build_student(cfg.model, cfg.latents, TrainConfig(use_lora=False))
                student.eval()
            student.to(resolve_device(cfg.device))
        texts, nlls = _latent_predictions(student, examples, cfg.batch_size, cfg.max_new_tokens, on_progress)
    else:
        from kvkd.models import load_model

        name = f"{cfg.model} ({cfg.mode})"
        loaded = load_model(cfg.model)
        loaded.model.to(resolve_device(cfg.device))
        texts, nlls = _text_predictions(loaded, examples, cfg, on_progress)
    lines, correct, status = [], 0, {"no_answer": 0, "unparsed": 0}
    for ex, text, nll in zip(examples, texts, nlls):
        v = score_answer(text, ex.answer, mode=check)
        correct += v.correct
        status[v.status] = status.get(v.status, 0) + 1
        lines.append(json.dumps({"id": ex.id, "gold": ex.answer, "prediction": v.prediction, "correct": v.correct,
                                 "status": v.status, "output": text, "answer_nll": nll}) + "\n")
    predictions = folder / PREDICTIONS_FILE
    _write_whole(predictions, "".join(lines))
    n = len(examples)
    lo, hi = wilson_interval(correct, n)
    result = EvalResult(
        name=name, mode=cfg.mode, data=data.source, n=n, correct=correct, accuracy=correct / n if n else 0.0,
        ci_low=lo, ci_high=hi, mean_answer_nll=sum(nlls) / n if n else float("nan"), wall_s=time.perf_counter() - t0,
        predictions=str(predictions), answer_check=check, split=cfg.split, fingerprint=dataset_fingerprint(examples),
        no_answer=status["no_answer"], unparsed=status["unparsed"], gold_kinds=gold_kinds, warnings=warnings,
        folder=str(folder), metrics=str(folder / METRICS_FILE),
    )
    _write_whole(folder / METRICS_FILE, json.dumps(metrics_json(result, cfg, data), indent=2) + "\n")
    return result


def metrics_json(result: EvalResult, cfg: EvalConfig, data: LoadResult) -> dict:
    """The ``metrics.json`` of an evaluation: the result, where its rows came from (source,
    format, split, offset, limit, fingerprint), what was evaluated (run, model, mode), the
    interval's definition and the library versions."""
    out = asdict(result)
    out.update({
        "interval": "95% Wilson score interval of the accuracy (ci_low, ci_high)",
        "nll_unit": "nats per gold-answer token",
        "format": data.fmt,
        "offset": cfg.offset or 0,
        "limit": cfg.limit,
        "run": str(Path(cfg.run).resolve()) if cfg.run else None,
        "model": cfg.model or None,
        "untrained": cfg.untrained,
        "versions": versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return out
