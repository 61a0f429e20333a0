"""Helpers for the cache tests: a tiny layout and deterministic, consistent rows."""

from __future__ import annotations

import numpy as np

from kvkd.cache import CacheLayout

# L=2 layers, H_kv=3 heads, M=4 slots, D=8 head dim, d=16 hidden; 10 examples in shards of 4.
TINY = CacheLayout(
    num_examples=10, num_layers=2, num_kv_heads=3, head_dim=8, hidden_size=16, slots=4, examples_per_shard=4
)

METADATA = {
    "teacher": {"model": "tiny-random-llama", "revision": "abc123", "num_layers": 2, "dtype": "float32"},
    "tokenizer": {"name": "tiny", "hash": "tok-hash-1", "vocab_size": 100},
    "dataset": {"name": "gsm8k", "split": "train", "rows": 10, "fingerprint": "fp-1"},
    "prompt": "Q: {question}\nA:",
    "compression": {"method": "kava", "slots": 4, "lambda": 0.1, "key_frame": "pre_rope"},
}


def make_rows(layout: CacheLayout, start: int, stop: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows for examples [start, stop) that pass every verify() check (same seed -> same rows)."""
    rng = np.random.default_rng([seed, start, stop])
    n, L, H, M = stop - start, layout.num_layers, layout.num_kv_heads, layout.slots
    D, d = layout.head_dim, layout.hidden_size
    cot_len = rng.integers(1, 2 * M, n).astype(np.int32)  # some CoTs shorter than M
    valid = np.arange(M) < np.minimum(cot_len, M)[:, None]  # (n, M): first min(cot_len, M) slots
    valid = np.broadcast_to(valid[:, None, None, :], (n, L, H, M)).copy()  # (n, L, H, M)
    pos = np.full((n, L, H, M), -1, dtype=np.int32)  # (n, L, H, M), -1 on empty slots
    for i, l, h in np.ndindex(n, L, H):  # kept slots: distinct CoT positions in original order
        k = min(int(cot_len[i]), M)
        pos[i, l, h, :k] = np.sort(rng.choice(int(cot_len[i]), k, replace=False))
    return {
        "keys": rng.standard_normal((n, L, H, M, D), dtype=np.float32),
        "values": rng.standard_normal((n, L, H, M, D), dtype=np.float32),
        "hidden": rng.standard_normal((n, L + 1, d), dtype=np.float32),
        "slot_pos": pos,
        "slot_importance": np.where(valid, rng.random((n, L, H, M), dtype=np.float32), 0).astype(np.float32),
        "slot_score": np.where(valid, rng.random((n, L, H, M), dtype=np.float32), 0).astype(np.float32),
        "slot_valid": valid,
        "cot_len": cot_len,
        "answer_len": rng.integers(1, 6, n).astype(np.int32),
        "answer_nll": rng.random(n, dtype=np.float32) * 3,
    }


def write_all(writer, seed: int = 0) -> dict[str, np.ndarray]:
    """Write every pending shard; return the full rows (concatenated in example order)."""
    layout = writer.layout
    for shard in writer.pending_shards():
        writer.write_shard(shard, make_rows(layout, *layout.shard_range(shard), seed=seed))
    return full_rows(layout, seed)


def full_rows(layout: CacheLayout, seed: int = 0) -> dict[str, np.ndarray]:
    shards = [make_rows(layout, *layout.shard_range(s), seed=seed) for s in range(layout.num_shards)]
    return {k: np.concatenate([r[k] for r in shards]) for k in shards[0]}
