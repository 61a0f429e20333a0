"""The *online* multi-teacher baseline: every teacher lives in memory and runs on every step.

This is what kvkd's offline caches replace. ``OnlineTeachers.batch`` produces, for a batch of
training rows, exactly the per-teacher tensors the cache loader would deliver (keys/values
compressed to M slots by the same KaVa eviction, boundary hidden states, slot masks and
importance, the teacher's answer NLL), by running each teacher's forward pass under
``torch.no_grad``. Only the benchmarks use it (``memory.py``, ``scaling.py``).
"""

from __future__ import annotations

import torch

from kvkd.data import Example, build_trace
from kvkd.models import load_model
from kvkd.pipeline.capture import capture_batch
from kvkd.pipeline.compress import DEFAULT_LAMBDA, gather_slots, select_slots
from kvkd.pipeline.extract import tokenize_teacher
from kvkd.prompts import PromptTemplate


class OnlineTeachers:
    """K teacher models held in memory (one separate copy each, as K distinct teachers would be).

    Args:
        specs: K teacher specs for ``kvkd.models.load_model`` (e.g. ``["smollm2"] * 2``).
        examples: the training rows (indexed by the loader's ``index``).
        slots: M, KV slots kept per (layer, KV head); lam: KaVa's eviction weight.
    """

    def __init__(self, specs: list[str], examples: list[Example], slots: int = 6, lam: float = DEFAULT_LAMBDA):
        self.loaded = [load_model(s) for s in specs]
        self.examples = examples
        self.traces = [build_trace(ex, "nl", drop_last_step=True) for ex in examples]
        self.slots, self.lam = slots, lam
        self.template = PromptTemplate()

    @torch.no_grad()
    def batch(self, index: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Teacher tensors for rows ``index`` (B,): K dicts shaped like ``collate``'s ``teachers``:
        keys/values (B, L, H_kv, M, D), hidden (B, L+1, d), slot_valid (B, L, H_kv, M) bool,
        slot_importance (B, L, H_kv, M), answer_nll (B,) float32, answer_len (B,) int32."""
        rows = index.tolist()
        out = []
        for loaded in self.loaded:
            tb = tokenize_teacher(loaded.tokenizer, [self.examples[i] for i in rows], [self.traces[i] for i in rows], self.template)
            cap = capture_batch(loaded.model, tb)
            sel = select_slots(cap.keys, cap.importance, cap.cot_mask, self.slots, self.lam)
            out.append({
                "keys": gather_slots(cap.keys, sel),
                "values": gather_slots(cap.values, sel),
                "hidden": cap.hidden,
                "slot_valid": sel.valid,
                "slot_importance": sel.importance,
                "answer_nll": cap.answer_nll,
                "answer_len": cap.answer_len.to(torch.int32),
            })
        return out
