"""Extraction throughput vs a bare teacher forward over the same rows and batch size.

    python benchmarks/extract_overhead.py     # SmolLM2, 32 GSM8K rows, batch 8, 3 repeats

All variants run in one process on the same tokenized batches (sorted by length inside the
shard, as the extractor does), alternating repeat by repeat; medians are reported:

- bare forward: ``model(input_ids, attention_mask)``, the full LM head on every token, as a
  user would run the teacher (the baseline);
- decoder only: the same without the LM head (for reference);
- ``kvkd extract``: capture (pre-RoPE keys, values, answer-row attention), importance,
  KaVa compression, codec, Zarr write, into a fresh store each repeat.

Target (issue 6): extract tokens/s over bare-forward tokens/s >= 0.90.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import _common as C
from kvkd.data import build_trace, load_examples
from kvkd.models import load_model
from kvkd.pipeline.extract import ExtractConfig, extract, tokenize_teacher
from kvkd.prompts import PromptTemplate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=str(C.DATA))
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=ExtractConfig.batch_size)
    ap.add_argument("--slots", type=int, default=ExtractConfig.slots)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    loaded = load_model(args.model)
    examples = load_examples(args.data, limit=args.rows).examples
    traces = [build_trace(ex, "nl", drop_last_step=True) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: len(traces[i]))
    batches = [
        tokenize_teacher(loaded.tokenizer, [examples[i] for i in order[b : b + args.batch_size]], [traces[i] for i in order[b : b + args.batch_size]], PromptTemplate())
        for b in range(0, len(order), args.batch_size)
    ]
    tokens = sum(b.num_tokens for b in batches)
    summaries = []

    @torch.no_grad()
    def bare():
        for b in batches:
            loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask)

    @torch.no_grad()
    def decoder_only():
        for b in batches:
            loaded.model.get_decoder()(input_ids=b.input_ids, attention_mask=b.attention_mask)

    def kvkd_extract():
        with tempfile.TemporaryDirectory() as tmp:
            s = extract(ExtractConfig(model=args.model, data=args.data, limit=args.rows, out=f"{tmp}/c.zarr", slots=args.slots, batch_size=args.batch_size), loaded=loaded)
        summaries.append(s)
        return s.wall_s

    bare()  # warm-up
    times = C.interleave({"bare_forward": bare, "decoder_only": decoder_only, "kvkd_extract": kvkd_extract}, args.repeats)
    tps = {k: tokens / C.median(v) for k, v in times.items()}
    assert all(s.tokens == tokens for s in summaries), "extract saw other tokens than the bare forward"
    ratio = tps["kvkd_extract"] / tps["bare_forward"]
    s = summaries[-1]
    res = {
        "command": f"python benchmarks/extract_overhead.py --rows {args.rows} --batch-size {args.batch_size} --repeats {args.repeats}",
        "args": vars(args),
        "tokens": tokens,
        "wall_s": times,
        "tokens_per_s": tps,
        "ratio_extract_over_bare_forward": ratio,
        "ratio_extract_over_decoder_only": tps["kvkd_extract"] / tps["decoder_only"],
        "target_ratio": 0.90,
        "bytes_per_example": s.bytes_per_example,
    }
    path = C.save("extract_overhead", res)
    print(f"rows {len(examples)}, batch size {args.batch_size}, {tokens} tokens, torch threads {torch.get_num_threads()}, {args.repeats} repeats (medians)")
    for k, v in tps.items():
        print(f"{k:14s} {v:,.0f} tokens/s ({C.median(times[k]):.2f} s)")
    print(f"ratio extract / bare forward: {ratio:.2f} (target >= 0.90); extract / decoder only: {res['ratio_extract_over_decoder_only']:.2f}")
    print(f"cache: {s.bytes_per_example:,.0f} bytes/example -> {path}")


if __name__ == "__main__":
    main()
