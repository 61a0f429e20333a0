"""Extraction throughput vs a bare teacher forward over the same rows and batch size.

    python benchmarks/extract_overhead.py --rows 64 --batch-size 8

Both are measured in the same process, on the same tokenized batches (sorted by length, as
the extractor does). The bare forward is ``model(input_ids, attention_mask)`` (full LM head,
as a user would run it) and, for reference, the decoder alone without the LM head.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from kvkd.data import build_trace, load_examples
from kvkd.models import load_model
from kvkd.pipeline.extract import ExtractConfig, extract, tokenize_teacher
from kvkd.prompts import PromptTemplate

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--slots", type=int, default=6)
    args = ap.parse_args()
    loaded = load_model(args.model)
    examples = load_examples(args.data, limit=args.rows).examples
    traces = [build_trace(ex, "nl", drop_last_step=True) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: len(traces[i]))
    batches = [tokenize_teacher(loaded.tokenizer, [examples[i] for i in order[b : b + args.batch_size]], [traces[i] for i in order[b : b + args.batch_size]], PromptTemplate())
               for b in range(0, len(order), args.batch_size)]
    tokens = sum(b.num_tokens for b in batches)
    with torch.no_grad():
        loaded.model(input_ids=batches[0].input_ids, attention_mask=batches[0].attention_mask)  # warm-up
        t = time.perf_counter()
        for b in batches:
            loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        bare = time.perf_counter() - t
        t = time.perf_counter()
        for b in batches:
            loaded.model.get_decoder()(input_ids=b.input_ids, attention_mask=b.attention_mask)
        decoder_only = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        summary = extract(ExtractConfig(model=args.model, data=args.data, limit=args.rows, out=f"{tmp}/c.zarr", slots=args.slots, batch_size=args.batch_size), loaded=loaded)
    print(f"rows {len(examples)}, batch size {args.batch_size}, {tokens} tokens, torch threads {torch.get_num_threads()}")
    print(f"bare forward (LM head on every token): {tokens / bare:,.0f} tokens/s ({bare:.2f} s)")
    print(f"decoder only (no LM head):             {tokens / decoder_only:,.0f} tokens/s ({decoder_only:.2f} s)")
    print(f"kvkd extract (capture+compress+write): {summary.tokens_per_s:,.0f} tokens/s ({summary.wall_s:.2f} s)")
    print(f"ratio extract / bare forward: {summary.tokens_per_s / (tokens / bare):.2f}; extract / decoder only: {summary.tokens_per_s / (tokens / decoder_only):.2f}")
    print(f"cache: {summary.bytes_stored:,} bytes, {summary.bytes_per_example:,.0f} bytes/example (M={args.slots}, float16 + zstd:3)")


if __name__ == "__main__":
    main()
