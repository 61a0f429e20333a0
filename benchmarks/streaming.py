"""Streaming: training step time with teacher caches read from disk vs the same tensors in memory,
and loader throughput (rows/s) vs what the trainer consumes.

    python benchmarks/streaming.py            # SmolLM2 student, 2 SmolLM2 caches, batch 4

Both step variants run the same student, optimiser and batches (``kvkd train``'s shuffled
batch order); "disk" pulls them through the training DataLoader (worker + prefetch, as
``kvkd train`` does), "memory" iterates the already-collated batches. Repeats alternate the
two. Targets (issue 6): disk / memory <= 1.05; loader rows/s >= 10x trainer rows/s.

Loader throughput is measured without training: batched reads (``DistillDataset.__getitems__``,
one cache read per teacher and batch) against per-row reads (one read per row and teacher,
the loader before issue 6), interleaved.
"""

from __future__ import annotations

import argparse
import time

from torch.utils.data import Dataset

import _common as C
from kvkd.train.trainer import TrainConfig


class PerRow(Dataset):
    """The loader before issue 6: ``__getitem__`` only, so every row reads every cache once."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds.__getitems__([i])[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="smollm2")
    ap.add_argument("--teachers", type=int, default=2, help="K teacher caches (copies of one SmolLM2 cache)")
    ap.add_argument("--rows", type=int, default=32, help="rows in each cache")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="steps per repeat (the first is a warm-up)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loader-batches", type=int, default=48, help="batches per loader-throughput repeat")
    ap.add_argument("--workers", type=int, default=TrainConfig.num_workers)
    args = ap.parse_args()

    caches = C.teacher_copies(C.smollm2_cache(args.rows), args.teachers)
    cfg = TrainConfig(student=args.student, batch_size=args.batch_size, num_workers=args.workers)
    bench = C.StepBench(caches, cfg, args.rows)
    batches = bench.batches(args.steps)
    in_memory = list(bench.loader(batches, num_workers=0))  # collated once, reused every repeat

    times = C.interleave({"disk": lambda: bench.timed_steps(bench.loader(batches)), "memory": lambda: bench.timed_steps(in_memory)}, args.repeats)
    disk, mem = C.median(times["disk"]), C.median(times["memory"])
    trainer_rows_s = args.batch_size / disk

    ds = bench.loader(batches, num_workers=0).dataset
    lb = bench.batches(args.loader_batches, seed=1)

    def drain(dataset, workers):
        t = time.perf_counter()
        for _ in bench.loader(lb, num_workers=workers, dataset=dataset):
            pass
        return time.perf_counter() - t

    rows = sum(len(b) for b in lb)
    lt = C.interleave(
        {
            "batched, main process": lambda: drain(ds, 0),
            "per-row, main process": lambda: drain(PerRow(ds), 0),
            f"batched, {args.workers} worker(s)": lambda: drain(ds, args.workers),
        },
        args.repeats,
    )
    loader_rows_s = {k: rows / C.median(v) for k, v in lt.items()}
    best = loader_rows_s[f"batched, {args.workers} worker(s)"]
    res = {
        "command": "python benchmarks/streaming.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "args": vars(args),
        "step_s": {"disk": times["disk"], "memory": times["memory"]},
        "median_step_s": {"disk": disk, "memory": mem},
        "ratio_disk_over_memory": disk / mem,
        "target_ratio": 1.05,
        "trainer_rows_per_s": trainer_rows_s,
        "loader_rows_per_s": loader_rows_s,
        "loader_s": lt,
        "ratio_loader_over_trainer": best / trainer_rows_s,
        "target_loader_over_trainer": 10.0,
        "batched_over_per_row_main_process": loader_rows_s["batched, main process"] / loader_rows_s["per-row, main process"],
    }
    path = C.save("streaming", res)
    C.figure("streaming", lambda ax: (ax.bar(list(loader_rows_s) + ["trainer consumes"], list(loader_rows_s.values()) + [trainer_rows_s], color=["C0", "C1", "C2", "C3"]),
                                      ax.set_ylabel("rows/s"), ax.set_yscale("log"), ax.set_title(f"loader vs trainer, K={args.teachers}", fontsize=9), ax.tick_params(axis="x", labelsize=7)))
    print(f"step time: disk {disk:.3f} s, memory {mem:.3f} s, ratio {disk / mem:.3f} (target <= 1.05)")
    for k, v in loader_rows_s.items():
        print(f"loader {k}: {v:,.0f} rows/s")
    print(f"trainer consumes {trainer_rows_s:.2f} rows/s; loader / trainer = {best / trainer_rows_s:,.0f}x (target >= 10x)")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
