"""Generation throughput of ``kvkd generate``: the hf engine vs the vLLM engine on the same
prompts and settings (SmolLM2-135M, greedy, GSM8K train questions), as tokens/s and a ratio.

Run it in the vLLM venv (both engines are there): ``.venv-vllm/bin/python
benchmarks/generate_throughput.py``. Each engine's model load is outside the timing; each
engine runs ``--repeats`` times, alternating hf and vllm, and the medians are compared. It
also reports how often the two engines' greedy completions agree (identical text, same first
40 characters) and each engine's solve rate on those rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DATA, median, save  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32, help="GSM8K train questions")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32, help="questions per engine call (both engines)")
    ap.add_argument("--dtype", default="float32", help="both engines (vLLM's CPU default would be bfloat16)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the hf engine (0 = default)")
    args = ap.parse_args()

    import torch

    from kvkd.generate import GenerateConfig, generate_traces, open_engine
    from kvkd.traces import read_trace_file

    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(model="smollm2", data=str(DATA), limit=args.rows, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, dtype=args.dtype)
    engines = {name: open_engine(GenerateConfig(engine=name, **common), None) for name in ("hf", "vllm")}
    engines["vllm"][0].load(GenerateConfig(engine="vllm", **common))
    work = Path(tempfile.mkdtemp(prefix="gen-bench-"))
    rates: dict[str, list[float]] = {"hf": [], "vllm": []}
    summaries = {}
    for rep in range(args.repeats):
        for name in ("hf", "vllm"):
            out = work / f"{name}-{rep}.jsonl"
            s = generate_traces(GenerateConfig(engine=name, out=str(out), **common), engine=engines[name])
            rates[name].append(s.tokens_per_s)
            summaries[name] = s
            print(f"repeat {rep} {name}: {s.tokens} tokens, {s.tokens_per_s:,.1f} tokens/s, solved {s.correct}/{s.traces}", flush=True)
    a, b = (read_trace_file(work / f"{n}-0.jsonl").lines for n in ("hf", "vllm"))
    same = sum(x["completion"] == y["completion"] for x, y in zip(a, b)) / len(a)
    prefix = sum(x["completion"][:40] == y["completion"][:40] for x, y in zip(a, b)) / len(a)
    hf, vl = median(rates["hf"]), median(rates["vllm"])
    result = {
        "args": vars(args), "hf_tokens_per_s": hf, "vllm_tokens_per_s": vl, "vllm_over_hf": vl / hf,
        "greedy_identical": same, "greedy_same_first_40_chars": prefix,
        "solve_rate": {n: {"correct": summaries[n].correct, "traces": summaries[n].traces, "ci95": [summaries[n].ci_low, summaries[n].ci_high]} for n in summaries},
        "engines": {n: summaries[n].engine for n in summaries}, "cpu_count": os.cpu_count(),
    }
    print(f"hf {hf:,.1f} tokens/s, vllm {vl:,.1f} tokens/s, ratio vllm/hf {vl / hf:.2f}; greedy identical {same:.0%}, same first 40 chars {prefix:.0%}")
    print(save("generate_throughput", result))


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    main()
