"""Where training steps are reported besides ``log.jsonl`` (always written): ``--report-to``
``tensorboard``, ``wandb``, ``trackio`` or ``none`` (comma-separated for several), the
convention of transformers' ``TrainingArguments.report_to``.

Each sink receives every step as flat scalars (:func:`scalars`): the total loss, CE, answer
NLL, every loss term per teacher (``codi/t0``, ``kv/t1``, ``cka/t0``), router weights per
teacher (``weights/t0``) and the router's own statistics, lr, step time, examples/s, and the
mean L2 norm of the latent thoughts next to the mean norm of the token embeddings
(:class:`LatentNorms`): continuous thoughts whose norm drifts far above the embeddings' are a
known failure of continuous-thought training (facebookresearch/coconut issue 29).

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` into ``RUN/tensorboard/`` (needs the
  ``tensorboard`` package: ``pip install 'kvkd[logging]'``).
- ``wandb``: ``wandb.init(dir=RUN, name=RUN's name, config=config.json)``; project from
  ``WANDB_PROJECT`` (default ``kvkd``); ``WANDB_MODE=offline`` logs without an account.
- ``trackio``: ``trackio.init(project=..., name=..., config=...)``, the same API, local-first.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

REPORT_TO = ("none", "tensorboard", "wandb", "trackio")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def parse_report_to(value: str) -> list[str]:
    """``"tensorboard,wandb"`` -> ``["tensorboard", "wandb"]``; ``"none"``/``""`` -> ``[]``.

    Raises:
        ValueError: an unknown sink (lists the known ones) or a sink whose package is missing
            (says what to install).
    """
    names = [n.strip() for n in (value or "").split(",") if n.strip() and n.strip() != "none"]
    for n in names:
        if n not in REPORT_TO:
            raise ValueError(f"--report-to {n!r}: choose from {', '.join(REPORT_TO)} (comma-separated for several)")
        try:
            __import__(_PACKAGE[n])
        except ImportError:
            raise ValueError(f"--report-to {n} needs the {_PACKAGE[n]} package: pip install 'kvkd[logging]' (or pip install {_PACKAGE[n]})") from None
    return names


def scalars(entry: dict) -> dict[str, float]:
    """A ``log.jsonl`` step entry as flat ``{tag: float}`` (lists per teacher become ``name/tK``;
    non-numbers are left out)."""
    out: dict[str, float] = {}
    for key, value in entry.items():
        if key == "step":
            continue
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
        elif isinstance(value, list):
            for k, v in enumerate(value):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"{key}/t{k}"] = float(v)
        elif isinstance(value, dict):
            for k, v in scalars(value).items():
                out[f"{key}/{k}"] = v
    return out


class LatentNorms:
    """Mean L2 norm of the latent thoughts a student produced since the last :meth:`pop`, next to
    the mean L2 norm of its token-embedding rows.

    A forward hook on the student's CODI projection (whose output z_1..z_M is fed back as the
    next input embedding) records ``||z||_2`` per thought; nothing in the step changes.

    Args:
        student: a :class:`kvkd.train.student.LatentStudent`.
    """

    def __init__(self, student):
        self.student = student
        self.sum, self.count = 0.0, 0
        self.handle = student.projection.register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output):
        with torch.no_grad():
            n = output.detach().float().norm(dim=-1)  # (B, 1) one norm per thought
            self.sum += float(n.sum())
            self.count += n.numel()

    def pop(self) -> tuple[float | None, float | None]:
        """(mean latent-thought norm, mean token-embedding norm) since the last call; None where
        unknown (no thought, or an embedding partitioned away by ZeRO-3)."""
        latent = self.sum / self.count if self.count else None
        self.sum, self.count = 0.0, 0
        weight = self.student.base.get_input_embeddings().weight
        embedding = float(weight.detach().float().norm(dim=-1).mean()) if weight.dim() == 2 and weight.numel() else None
        return latent, embedding

    def close(self) -> None:
        self.handle.remove()


class _TensorBoard:
    def __init__(self, run: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run / "tensorboard"))

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    module = "wandb"

    def __init__(self, run: Path, config: dict):
        self.lib = __import__(self.module)
        self.run = self.lib.init(project=os.environ.get("WANDB_PROJECT", "kvkd"), name=run.name, dir=str(run), config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.lib.log(values, step=step)

    def close(self) -> None:
        self.lib.finish()


class _Trackio(_Wandb):
    module = "trackio"

    def __init__(self, run: Path, config: dict):
        self.lib = __import__(self.module)
        self.run = self.lib.init(project=os.environ.get("TRACKIO_PROJECT", "kvkd"), name=run.name, config=config)


_SINKS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio}


class Sinks:
    """The ``--report-to`` sinks of one run (rank 0), fed one step entry at a time.

    Args:
        names: sink names (from :func:`parse_report_to`).
        run: the run folder; config: the run's ``config.json`` (wandb/trackio record it).
    """

    def __init__(self, names: list[str], run: str | Path, config: dict | None = None):
        self.sinks = [_SINKS[n](Path(run), config or {}) for n in names]

    def log(self, entry: dict) -> None:
        if self.sinks:
            values = scalars(entry)
            for s in self.sinks:
                s.log(values, int(entry["step"]))

    def close(self) -> None:
        for s in self.sinks:
            s.close()
