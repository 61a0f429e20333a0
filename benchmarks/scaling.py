"""Scaling: extraction time vs examples, cache size vs M, training step time vs teachers K.

    python benchmarks/scaling.py              # SmolLM2 teacher/student; N 8..64, M 1..16, K 1..8

- extraction: ``kvkd extract`` wall time and tokens/s for the first N GSM8K rows (one loaded
  teacher, fresh store each time);
- cache size: stored bytes per example (float16 + the default compressor) for M slots;
- step time: median training step (caches streamed from disk through the training
  DataLoader) for K = 1, 2, 4, 8 teacher caches, and the online baseline (K teachers in
  memory, run every step) for the smaller K. Repeats alternate the order of K.
"""

from __future__ import annotations

import argparse
import tempfile

import _common as C
from kvkd.models import load_model
from kvkd.pipeline.extract import ExtractConfig, extract
from kvkd.train.trainer import TrainConfig


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", default="8,16,32,64", help="N for the extraction curve")
    ap.add_argument("--slots", default="1,2,4,6,8,12,16", help="M for the size curve")
    ap.add_argument("--size-rows", type=int, default=16, help="rows extracted per M")
    ap.add_argument("--teachers", default="1,2,4,8", help="K for the step-time curve")
    ap.add_argument("--online-teachers", default="1,2", help="K for the online baseline curve (each K loads K teachers)")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="steps per measurement (the first is a warm-up)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    teacher = load_model("smollm2")
    out: dict = {"command": "python benchmarks/scaling.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "args": vars(args)}

    with tempfile.TemporaryDirectory() as tmp:
        ext = []
        for n in ints(args.examples):
            s = extract(ExtractConfig(data=str(C.DATA), limit=n, out=f"{tmp}/n{n}.zarr"), loaded=teacher)
            ext.append({"examples": n, "tokens": s.tokens, "wall_s": s.wall_s, "tokens_per_s": s.tokens_per_s})
            print(f"extract N={n}: {s.wall_s:.2f} s, {s.tokens_per_s:,.0f} tokens/s")
        size = []
        for m in ints(args.slots):
            s = extract(ExtractConfig(data=str(C.DATA), limit=args.size_rows, out=f"{tmp}/m{m}.zarr", slots=m), loaded=teacher)
            size.append({"slots": m, "bytes_per_example": s.bytes_per_example})
            print(f"cache M={m}: {s.bytes_per_example:,.0f} bytes/example")
    del teacher
    out["extraction"], out["cache_size"] = ext, size

    base = C.smollm2_cache(args.rows)
    cfg = TrainConfig(batch_size=args.batch_size)
    steps: dict[str, list[float]] = {}
    ks, online_ks = ints(args.teachers), ints(args.online_teachers)
    for r in range(args.repeats):
        for k in ks if r % 2 == 0 else ks[::-1]:
            bench = C.StepBench(C.teacher_copies(base, k), cfg, args.rows)
            steps.setdefault(f"offline-{k}", []).append(bench.timed_steps(bench.loader(bench.batches(args.steps))))
            if k in online_ks:
                from online import OnlineTeachers

                from kvkd.train.loader import DistillDataset

                online = OnlineTeachers(["smollm2"] * k, bench.examples)
                text = DistillDataset(bench.examples, bench.trainee.student.tokenizer, [])

                def with_teachers(loader):
                    for b in loader:
                        b["teachers"] = online.batch(b["index"])
                        yield b

                steps.setdefault(f"online-{k}", []).append(bench.timed_steps(with_teachers(bench.loader(bench.batches(args.steps), dataset=text))))
                del online
            del bench
            print(f"K={k}: " + ", ".join(f"{n} {v[-1]:.2f} s/step" for n, v in steps.items() if n.endswith(f"-{k}")))
    out["step_s"] = steps
    out["median_step_s"] = {n: C.median(v) for n, v in steps.items()}
    path = C.save("scaling", out)

    C.figure("scaling_extraction", lambda ax: (ax.plot([e["examples"] for e in ext], [e["wall_s"] for e in ext], "o-"),
                                               ax.set_xlabel("examples N"), ax.set_ylabel("kvkd extract wall time, s"), ax.set_title("extraction time vs examples (SmolLM2)", fontsize=9)))
    C.figure("scaling_cache_size", lambda ax: (ax.plot([s["slots"] for s in size], [s["bytes_per_example"] / 1e3 for s in size], "o-"),
                                               ax.set_xlabel("slots M"), ax.set_ylabel("kB per example (fp16 + zstd:3)"), ax.set_title("cache size vs M (SmolLM2, 30 layers x 3 KV heads)", fontsize=9)))

    def plot_steps(ax):
        for mode in ("offline", "online"):
            pts = sorted((int(n.split("-")[1]), v) for n, v in out["median_step_s"].items() if n.startswith(mode))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("teachers K")
        ax.set_ylabel("median step time, s")
        ax.set_title(f"step time vs teachers (SmolLM2 student, batch {args.batch_size})", fontsize=9)
        ax.legend()

    C.figure("scaling_teachers", plot_steps)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
