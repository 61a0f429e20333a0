"""Planted routing truth: which teachers are good on which training row, and routing accuracy.

A *truth file* records, for every training row (in cache order), which of the K teachers is
good on it: for instance because the teacher read that row's gold trace rather than another
row's (a planted scenario, ``benchmarks/router_truth.py``). The ``oracle`` router reads it to
route perfectly; :func:`routing_accuracy` scores any router's per-row weights against it.

Format (JSON, ``"format": "kvkd-router-truth/1"``)::

    {"format": "kvkd-router-truth/1",
     "scenario": "corrupted-k3",            # free text
     "teachers": ["gold", "gold", "wrong"],  # K names, in --cache order
     "rows": [{"id": "gsm8k-train-0", "good": [true, true, false],
               "trace_from": ["gsm8k-train-0", "gsm8k-train-0", "gsm8k-train-7"]}, ...]}

``good`` is required (K booleans per row); a row may instead or also give ``weights`` (K
non-negative numbers, the oracle's weights for it). ``trace_from`` (optional) names the row
whose trace each teacher read. Nothing here imports a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

TRUTH_FORMAT = "kvkd-router-truth/1"


@dataclass
class Truth:
    """A truth file in memory.

    Attributes:
        ids: N row ids, in cache order.
        good: (N, K) bool, teacher k is good on row n.
        weights: (N, K) float32 oracle weights (each row sums to 1): the row's ``weights`` if
            given, else uniform over its good teachers (uniform over all when none is good).
        teachers: K teacher names.
        scenario: free text.
        trace_from: N lists of K row ids (empty lists when the file has none).
    """

    ids: list[str]
    good: torch.Tensor
    weights: torch.Tensor
    teachers: list[str]
    scenario: str = ""
    trace_from: list[list[str]] = field(default_factory=list)


def truth_weights(good: torch.Tensor) -> torch.Tensor:
    """(N, K) bool -> (N, K) float32: uniform over each row's good teachers (all when none is)."""
    g = good.float()
    g[g.sum(-1) == 0] = 1.0
    return g / g.sum(-1, keepdim=True)


def write_truth(path: str | Path, ids: list[str], good: list[list[bool]], teachers: list[str], scenario: str = "",
                trace_from: list[list[str]] | None = None) -> Path:
    """Write a truth file (atomically: a temporary file renamed into place).

    Raises:
        ValueError: ragged rows or a row whose length differs from ``teachers``.
    """
    K = len(teachers)
    if len(good) != len(ids) or any(len(g) != K for g in good):
        raise ValueError(f"truth file {path}: need {len(ids)} rows of {K} booleans")
    rows = []
    for i, (rid, g) in enumerate(zip(ids, good)):
        row = {"id": rid, "good": [bool(x) for x in g]}
        if trace_from is not None:
            row["trace_from"] = list(trace_from[i])
        rows.append(row)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": TRUTH_FORMAT, "scenario": scenario, "teachers": list(teachers), "rows": rows}, indent=1))
    tmp.replace(path)
    return path


def read_truth(path: str | Path) -> Truth:
    """Read and check a truth file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, another format, or a row without K booleans ``good`` / with
            bad ``weights`` (negative, all zero, wrong count); names the file and the row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"truth file {path} not found: write one with kvkd.train.routers.truth.write_truth (format {TRUTH_FORMAT})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"truth file {path} is not JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != TRUTH_FORMAT:
        raise ValueError(f"truth file {path}: expected \"format\": \"{TRUTH_FORMAT}\"")
    teachers, rows = data.get("teachers"), data.get("rows")
    if not isinstance(teachers, list) or not teachers or not isinstance(rows, list) or not rows:
        raise ValueError(f"truth file {path}: needs non-empty \"teachers\" and \"rows\" lists")
    K = len(teachers)
    ids, good, weights, trace_from = [], [], [], []
    for n, row in enumerate(rows):
        g = row.get("good") if isinstance(row, dict) else None
        if not isinstance(g, list) or len(g) != K or not all(isinstance(x, bool) for x in g):
            raise ValueError(f"truth file {path}, row {n}: \"good\" must be {K} booleans (one per teacher)")
        ids.append(str(row.get("id", n)))
        good.append(g)
        w = row.get("weights")
        if w is not None:
            if not isinstance(w, list) or len(w) != K or any(not isinstance(x, (int, float)) or x < 0 for x in w) or sum(w) <= 0:
                raise ValueError(f"truth file {path}, row {n}: \"weights\" must be {K} non-negative numbers, not all zero")
        weights.append(w)
        trace_from.append([str(x) for x in row.get("trace_from", [])])
    good_t = torch.tensor(good, dtype=torch.bool)
    w_t = truth_weights(good_t)
    for n, w in enumerate(weights):
        if w is not None:
            w_t[n] = torch.tensor(w, dtype=torch.float32) / float(sum(w))
    return Truth(ids, good_t, w_t, [str(t) for t in teachers], str(data.get("scenario", "")), trace_from)


def routing_accuracy(weights: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
    """Per-sample routing accuracy: the weight a router gave to the teachers good on the sample.

    1.0 = all weight on good teachers; uniform weights score the share of good teachers
    (1/K with one good teacher out of K). Samples with no good teacher are undefined (NaN).

    Args:
        weights: (B, K) router weights, rows summing to 1.
        good: (B, K) bool planted truth.
    Returns:
        (B,) float32.
    """
    acc = (weights.float() * good.float()).sum(-1)
    return torch.where(good.any(-1), acc, torch.full_like(acc, float("nan")))
