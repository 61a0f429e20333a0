"""Streaming cache rows next to the training examples.

:class:`DistillDataset` pairs example i of the training data with row i of every teacher
cache (the caches were checked to hold the same rows, see ``kvkd.cache.compat``). Rows are
read from Zarr on demand, in DataLoader workers with prefetch; readers are opened lazily
in each worker process. Nothing here loads a teacher model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from kvkd.cache.reader import CacheReader
from kvkd.data import Example
from kvkd.prompts import PromptTemplate, token_span

TEACHER_FIELDS = ("keys", "values", "hidden", "slot_valid", "slot_importance", "answer_nll", "answer_len")


@dataclass
class StudentText:
    """Tokenized student text of one example: question ids, answer-text ids, answer start."""

    q_ids: list[int]
    s_ids: list[int]
    answer_start: int


def tokenize_student(tokenizer, example: Example, template: PromptTemplate) -> StudentText:
    """Tokenize ``question`` and ``The answer is: A<eos>`` separately (the latents go between).

    Raises:
        ValueError: if the answer has no token or starts at token 0.
    """
    q_ids = tokenizer(template.question_text(example.question), add_special_tokens=True)["input_ids"]
    text, span = template.answer_text(example.answer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start, stop = token_span(enc["offset_mapping"], span)
    if stop <= start or start < 1:
        raise ValueError(f"example {example.id}: cannot locate the answer {example.answer!r} in its tokens")
    return StudentText(q_ids=q_ids, s_ids=enc["input_ids"] + [tokenizer.eos_token_id], answer_start=start)


class DistillDataset(Dataset):
    """Examples with their teachers' cached rows.

    Args:
        examples: the training rows, in cache order.
        tokenizer: the student's tokenizer.
        cache_urls: one cache per teacher (K of them).
        template: prompt layout.
        teacher_extras: optional K dicts ``{field: (N, ...) tensor}`` of further per-example
            teacher data that loss terms asked for (``kvkd.train.losses.base.teacher_extras``,
            e.g. SIM-CoT's tokenised steps); row i's slices join teacher k's item dict.
    Item: dict with ``index``, ``q_ids``, ``s_ids``, ``answer_start`` and ``teachers``: K dicts
    of float32 tensors (keys/values (L, H_kv, M, D), hidden (L+1, d), slot_valid (L, H_kv, M)
    bool, slot_importance (L, H_kv, M), answer_nll () nats/token, answer_len () int32 tokens),
    plus the extras' fields.
    Raises:
        ValueError: an extra field that is not N rows long or shadows a cache field.
    """

    def __init__(self, examples: list[Example], tokenizer, cache_urls: list[str], template: PromptTemplate = PromptTemplate(),
                 teacher_extras: list[dict[str, torch.Tensor]] | None = None):
        self.examples = examples
        self.texts = [tokenize_student(tokenizer, ex, template) for ex in examples]
        self.cache_urls = list(cache_urls)
        self.extras = teacher_extras or [{} for _ in self.cache_urls]
        for k, extra in enumerate(self.extras):
            for name, value in extra.items():
                if name in TEACHER_FIELDS or len(value) != len(examples):
                    raise ValueError(f"teacher {k}: extra loader field {name!r} must be new and hold {len(examples)} rows, got {len(value)}")
        self._readers: list[CacheReader] | None = None

    def readers(self) -> list[CacheReader]:
        if self._readers is None:  # lazily, so each DataLoader worker opens its own
            self._readers = [CacheReader.open(url) for url in self.cache_urls]
        return self._readers

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """Items for a whole batch, reading each teacher cache once.

        ``DataLoader`` calls this with the batch sampler's indices (torch >= 2.1), so a batch of
        B examples costs one ``CacheReader.read`` per teacher (one Zarr selection per array,
        shard-wise decompression) instead of B: measured in ``benchmarks/streaming.py``.
        """
        indices = [int(i) for i in indices]
        rows = [reader.read(indices) for reader in self.readers()]  # K dicts of (B, ...) arrays
        # one float32/bool tensor per field and teacher; items view slices of it (no copies)
        fields = [{name: torch.from_numpy(np.ascontiguousarray(r[name])) for name in TEACHER_FIELDS} for r in rows]
        items = []
        for b, i in enumerate(indices):
            text = self.texts[i]
            teachers = [{**{name: f[name][b] for name in TEACHER_FIELDS}, **{name: v[i] for name, v in extra.items()}}
                        for f, extra in zip(fields, self.extras)]
            items.append({"index": i, "q_ids": text.q_ids, "s_ids": text.s_ids, "answer_start": text.answer_start, "teachers": teachers})
        return items

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = None  # zarr handles are reopened in the worker
        return state


def collate(items: list[dict], pad_id: int) -> dict:
    """Pad a list of items: questions on the left, answer texts on the right.

    Returns:
        dict with q_ids/q_mask (B, Tq), s_ids/s_mask (B, Ts), answer_start (B,), index (B,),
        and ``teachers``: K dicts of stacked tensors (B, ...), one per field of the items.
    """
    B = len(items)
    Tq = max(len(it["q_ids"]) for it in items)
    Ts = max(len(it["s_ids"]) for it in items)
    q_ids = torch.full((B, Tq), pad_id, dtype=torch.long)
    q_mask = torch.zeros((B, Tq), dtype=torch.long)
    s_ids = torch.full((B, Ts), pad_id, dtype=torch.long)
    s_mask = torch.zeros((B, Ts), dtype=torch.long)
    for b, it in enumerate(items):
        q, s = it["q_ids"], it["s_ids"]
        q_ids[b, Tq - len(q):] = torch.tensor(q)
        q_mask[b, Tq - len(q):] = 1
        s_ids[b, : len(s)] = torch.tensor(s)
        s_mask[b, : len(s)] = 1
    K = len(items[0]["teachers"])
    teachers = [{name: torch.stack([it["teachers"][k][name] for it in items]) for name in items[0]["teachers"][k]} for k in range(K)]
    return {
        "index": torch.tensor([it["index"] for it in items]),
        "q_ids": q_ids,
        "q_mask": q_mask,
        "s_ids": s_ids,
        "s_mask": s_mask,
        "answer_start": torch.tensor([it["answer_start"] for it in items]),
        "teachers": teachers,
    }
