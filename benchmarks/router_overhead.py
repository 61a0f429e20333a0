"""Router overhead: training step time with each registered router over the ``fixed`` router.

    python benchmarks/router_overhead.py      # every name in ROUTERS, SmolLM2 student, K=2

One student, one set of in-memory batches (collated from the caches once, so disk reads do
not blur the comparison) and one aligner per teacher; only the router changes between
variants, and repeats alternate the routers. Routers registered later (issue 3) are picked
up automatically through ``ROUTERS.names()``.
"""

from __future__ import annotations

import argparse

import _common as C
from kvkd.train.routers import ROUTERS, build_router
from kvkd.train.trainer import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="smollm2")
    ap.add_argument("--teachers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="steps per repeat (the first is a warm-up)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--routers", default="", help="comma-separated subset (default: all registered)")
    args = ap.parse_args()
    names = args.routers.split(",") if args.routers else ROUTERS.names()
    names = ["fixed", *[n for n in names if n != "fixed"]]  # the baseline first
    caches = C.teacher_copies(C.smollm2_cache(args.rows), args.teachers)
    bench = C.StepBench(caches, TrainConfig(student=args.student, batch_size=args.batch_size), args.rows)
    batches = list(bench.loader(bench.batches(args.steps), num_workers=0))
    d = bench.trainee.student.hidden_size
    routers = {n: build_router(n, args.teachers, d, {}) for n in names}

    def variant(name):
        def run():
            bench.trainee.router = routers[name]  # timed_steps resets weights and builds a fresh AdamW
            bench.cfg.router = name
            return bench.timed_steps(batches)
        return run

    variant("fixed")()  # warm-up (allocator, autograd caches) outside the measurement
    times = C.interleave({n: variant(n) for n in names}, args.repeats)
    med = {n: C.median(v) for n, v in times.items()}
    ratio = {n: med[n] / med["fixed"] for n in names}
    path = C.save("router_overhead", {"command": f"python benchmarks/router_overhead.py --teachers {args.teachers} --batch-size {args.batch_size} --steps {args.steps} --repeats {args.repeats}",
                                      "args": vars(args), "routers": names, "step_s": times, "median_step_s": med, "ratio_over_fixed": ratio})
    for n in names:
        print(f"{n:14s} {med[n]:.3f} s/step  x{ratio[n]:.3f} of fixed")
    C.figure("router_overhead", lambda ax: (ax.bar(names, [ratio[n] for n in names]), ax.axhline(1.0, color="k", lw=0.8),
                                            ax.set_ylabel("step time / fixed"), ax.set_title(f"router overhead (K={args.teachers}, batch {args.batch_size})", fontsize=9),
                                            ax.tick_params(axis="x", labelsize=7, rotation=30)))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
