"""What a run knows about its teachers before training: projection-fitting rows read from each
cache, and the per-teacher record written into the run's ``config.json`` (shape, layer map,
projections, and whether the teacher shares the student's tokenizer).

Latent distillation needs no token correspondence (docs/design.md, section 4): the KV slots are
position-free and each side finds the answer boundary in its own tokenization from
character offsets, so teachers whose tokenizer differs from the student's train normally;
the record says which ones do, so that a reader of the run knows.
"""

from __future__ import annotations

import numpy as np

from kvkd.cache.compat import tokenizer_differences
from kvkd.cache.reader import CacheReader
from kvkd.train.align import Shape, TeacherAligner

FIT_FIELDS = ("keys", "values", "slot_valid", "hidden")


def fit_samples(reader: CacheReader, rows: int) -> dict[str, np.ndarray]:
    """The first ``rows`` examples of a cache (keys, values, slot_valid, hidden), for fitting projections.

    Args:
        reader: an open cache; rows: examples wanted (capped at the cache's size; >= 1).
    Returns:
        name -> array with a leading axis of min(rows, N) (shapes of ``CacheReader.read``).
    """
    n = max(1, min(rows, len(reader)))
    data = reader.read(slice(0, n))
    return {k: data[k] for k in FIT_FIELDS}


def needs_fit(teacher: Shape, student: Shape) -> bool:
    """True if a projection shrinks a space (its fixed basis is then fitted on cached rows)."""
    return teacher.num_kv_heads * teacher.head_dim > student.num_kv_heads * student.head_dim or teacher.hidden_size > student.hidden_size


def describe_teachers(urls: list[str], metas: list[dict], student_tokenizer: dict, aligners: list[TeacherAligner], layer_specs: list) -> list[dict]:
    """One JSON record per teacher for the run's ``config.json`` (the CLI prints it too).

    Returns:
        dicts with ``cache``, ``teacher`` (spec), ``architecture``, ``trace``, ``shape``
        (L, H_kv, D, d), ``tokenizer`` (source, vocab size, hash), ``tokenizer_shared_with_student``,
        ``tokenizer_differences`` (empty when shared), ``layer_map_spec`` and ``alignment``
        (:meth:`TeacherAligner.describe`).
    """
    out = []
    for url, meta, aligner, spec in zip(urls, metas, aligners, layer_specs):
        tok = meta.get("tokenizer", {})
        diff = tokenizer_differences(tok, student_tokenizer)
        out.append(
            {
                "cache": url,
                "teacher": meta.get("teacher", {}).get("spec"),
                "architecture": meta.get("teacher", {}).get("architecture"),
                "trace": meta.get("dataset", {}).get("trace"),
                "shape": {"num_layers": aligner.teacher.num_layers, "num_kv_heads": aligner.teacher.num_kv_heads, "head_dim": aligner.teacher.head_dim, "hidden_size": aligner.teacher.hidden_size},
                "tokenizer": {k: tok.get(k) for k in ("source", "vocab_size", "hash")},
                "tokenizer_shared_with_student": not diff,
                "tokenizer_differences": diff,
                "layer_map_spec": spec,
                "alignment": aligner.describe(),
            }
        )
    return out
