"""Validation during training: a student scored on held-out rows (gold-answer NLL, cheaply;
optionally accuracy), and the schedule that runs it every ``--valid-every`` steps, logs it and
keeps the best checkpoint by validation NLL.

Validation rows must be held out: :class:`Validator` refuses rows that are among the training
rows or the evaluation set (``--eval-data``). ``../shared/data/gsm8k_aug/valid.jsonl`` holds
GSM8K-train rows (not in the GSM8K test set, but in GSM8K train: train on other rows).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from kvkd.data import DataError, Example, load_examples
from kvkd.eval.answers import check_gold_answers, score_answer
from kvkd.eval.evaluate import _latent_predictions
from kvkd.eval.overlap import find_overlap, held_out_examples

__all__ = ["BEST_DIR", "ValidationResult", "Validator", "validate"]

BEST_DIR = "best"


@dataclass
class ValidationResult:
    """A student scored on validation rows (:func:`validate`).

    Attributes:
        n: rows; mean_answer_nll: mean gold-answer NLL, nats/token (teacher-forced after the
            latent thoughts); accuracy: greedy-decoding accuracy, or None when not asked for.
    """

    n: int
    mean_answer_nll: float
    accuracy: float | None = None


def validate(student, examples: list[Example], batch_size: int = 8, accuracy: bool = False,
             max_new_tokens: int = 12, answer_check: str = "numeric") -> ValidationResult:
    """Score a latent student on validation rows, cheaply: the gold-answer NLL (one forward
    pass per batch) and, with ``accuracy``, greedy answers checked like ``kvkd eval``.

    The student is put in eval mode for the pass and returned to its previous mode.
    Validation rows must be held out from the test set (see
    :func:`kvkd.eval.overlap.find_overlap`); ``../shared/data/gsm8k_aug/valid.jsonl`` is
    GSM8K-train rows.

    Args:
        student: a :class:`kvkd.train.student.LatentStudent`.
        examples: the validation rows (non-empty).
        batch_size: rows per forward pass.
        accuracy: also decode and score answers (``max_new_tokens`` tokens each).
        answer_check: ``numeric`` or ``math``.
    Returns:
        :class:`ValidationResult`.
    Raises:
        ValueError: no rows; DataError: (numeric) a gold answer the check cannot represent.
    """
    if not examples:
        raise ValueError("no validation rows")
    if accuracy:
        check_gold_answers(((ex.id, ex.answer) for ex in examples), answer_check, "validation rows")
    was_training = student.training
    student.eval()
    try:
        texts, nlls = _latent_predictions(student, examples, batch_size, max_new_tokens if accuracy else None)
    finally:
        student.train(was_training)
    acc = None
    if accuracy:
        acc = sum(score_answer(t, ex.answer, answer_check).correct for t, ex in zip(texts, examples)) / len(examples)
    return ValidationResult(len(examples), sum(nlls) / len(nlls), acc)


class Validator:
    """Runs :func:`validate` during training and keeps the best checkpoint.

    Every ``cfg.valid_every`` steps (and at the last step) the student's validation NLL is
    computed (on every rank, averaged over them: the same weights give the same value); when
    it is the lowest so far, the engine saves a checkpoint into ``RUN/best/`` (a run folder of
    its own, with ``config.json``, one checkpoint and ``best.json`` = step and NLL), so
    ``kvkd eval --run RUN/best`` evaluates the best student. Without ``cfg.valid_data`` it
    does nothing.

    Args:
        cfg: a TrainConfig (``valid_data``, ``valid_every``, ``valid_limit``, ``eval_data``,
            ``batch_size``, ``steps``).
        train_rows: the training rows (validation rows among them are refused).
        run: the run folder.
    Raises:
        DataError: validation rows among the training rows or the ``--eval-data`` rows, or
            unreadable. ValueError: ``valid_every`` < 0.
    """

    def __init__(self, cfg, train_rows: list[Example], run: Path):
        self.cfg, self.run, self.rows = cfg, Path(run), []
        if not cfg.valid_data:
            return
        if cfg.valid_every < 0:
            raise ValueError(f"--valid-every must be >= 0, got {cfg.valid_every}")
        path = Path(cfg.valid_data).expanduser()
        split = "valid" if path.is_dir() and any(path.glob("valid.*")) else None
        self.rows = load_examples(cfg.valid_data, split=split, limit=cfg.valid_limit).examples
        for other, what in ((train_rows, "the training rows"), (held_out_examples(cfg.eval_data) if cfg.eval_data else [], f"--eval-data {cfg.eval_data}")):
            found = find_overlap(other, self.rows)
            if found:
                raise DataError(f"--valid-data {cfg.valid_data}: {found.describe('validation rows', what)}. "
                                "Validate on held-out rows (neither trained on nor tested)")
        best = self.run / BEST_DIR / "best.json"
        self.best = json.loads(best.read_text())["valid_nll"] if best.is_file() else math.inf  # a resumed run keeps its best

    def due(self, step: int) -> bool:
        """Whether to validate after optimiser step ``step`` (1-based)."""
        every = self.cfg.valid_every
        return bool(self.rows) and ((every > 0 and step % every == 0) or step == self.cfg.steps)

    def __call__(self, step: int, student, engine) -> float:
        """Validate now; save ``RUN/best`` when the NLL is the lowest so far. Returns the NLL."""
        with engine.autocast():
            nll = validate(student, self.rows, self.cfg.batch_size).mean_answer_nll
        nll = float(engine.all_mean(torch.tensor([nll], dtype=torch.float64), 1.0)[0])
        if nll < self.best:
            self.best = nll
            best = self.run / BEST_DIR
            engine.save(best, step, 1)
            if engine.rank == 0:
                shutil.copyfile(self.run / "config.json", best / "config.json")
                (best / "best.json").write_text(json.dumps({"step": step, "valid_nll": nll, "valid_data": self.cfg.valid_data, "rows": len(self.rows)}))
        return nll
