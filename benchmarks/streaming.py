"""Streaming: training step time with teacher caches read from disk vs the same tensors in memory,
and loader throughput (rows/s) vs what the trainer consumes.

    python benchmarks/streaming.py            # SmolLM2 student, 2 SmolLM2 caches, batch 4
    PYTHONPATH=$PWD python benchmarks/streaming.py --s3   # the same caches from moto's S3 server vs local disk

Both step variants run the same student, optimiser and batches (``kvkd train``'s shuffled
batch order); "disk" pulls them through the training DataLoader (worker + prefetch, as
``kvkd train`` does), "memory" iterates the already-collated batches. Repeats alternate the
two. Targets (issue 6): disk / memory <= 1.05; loader rows/s >= 10x trainer rows/s.

Loader throughput is measured without training: batched reads (``DistillDataset.__getitems__``,
one cache read per teacher and batch) against per-row reads (one read per row and teacher,
the loader before issue 6), interleaved.

``--s3`` (issue 11) instead copies the caches to moto's S3 server on 127.0.0.1 (the test
server, ``tests/servers.py``; needs the ``test`` extra) and compares local disk with S3:
loader rows/s from disk, from S3 cold (a fresh ``$KVKD_HOME``: every object downloaded once,
the first pass) and from S3 warm (the local read-through copies under ``$KVKD_HOME/remote``,
every later pass), and the trainer's step time from disk vs S3 warm (ratio). Written to
``results/streaming_s3.json``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
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
    ap.add_argument("--s3", action="store_true", help="compare local disk with moto's S3 server instead (see above)")
    args = ap.parse_args()

    caches = C.teacher_copies(C.smollm2_cache(args.rows), args.teachers)
    if args.s3:
        return s3_vs_local(args, caches)
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


def s3_vs_local(args, caches: list[str]) -> None:
    """Loader rows/s and step time: local disk vs the same caches on moto's S3 server."""
    from pathlib import Path

    import s3fs

    from tests.servers import S3Server

    server = S3Server().start()
    os.environ.update(server.env())
    server.create_bucket("kvkd-bench")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    remote = []
    for url in caches:
        dst = f"kvkd-bench/{Path(url).name}"
        for f in Path(url).rglob("*"):
            if f.is_file() and ".claims" not in f.parts:
                fs.pipe_file(f"{dst}/{f.relative_to(url).as_posix()}", f.read_bytes())
        remote.append(f"s3://{dst}")
    scratch = Path(tempfile.mkdtemp(prefix="kvkd-bench-s3-"))
    warm_home = scratch / "warm"
    cfg = TrainConfig(student=args.student, batch_size=args.batch_size, num_workers=args.workers)
    local_bench, s3_bench = C.StepBench(caches, cfg, args.rows), C.StepBench(remote, cfg, args.rows)
    lb = local_bench.batches(args.loader_batches, seed=1)
    rows = sum(len(b) for b in lb)
    cold = iter(range(10**6))

    def drain(bench, home: Path):
        os.environ["KVKD_HOME"] = str(home)  # read by the readers each worker opens
        t = time.perf_counter()
        for _ in bench.loader(lb):
            pass
        return time.perf_counter() - t

    drain(s3_bench, warm_home)  # fill the warm copies
    lt = C.interleave({
        "local disk": lambda: drain(local_bench, scratch / "unused"),
        "S3 cold (downloading)": lambda: drain(s3_bench, scratch / f"cold{next(cold)}"),
        "S3 warm (read-through copy)": lambda: drain(s3_bench, warm_home),
    }, args.repeats)
    loader_rows_s = {k: rows / C.median(v) for k, v in lt.items()}
    batches = local_bench.batches(args.steps)
    os.environ["KVKD_HOME"] = str(warm_home)
    times = C.interleave({"local disk": lambda: local_bench.timed_steps(local_bench.loader(batches)),
                          "S3 warm": lambda: s3_bench.timed_steps(s3_bench.loader(batches))}, args.repeats)
    step = {k: C.median(v) for k, v in times.items()}
    requests = len(server.log.since(0))
    server.stop()
    res = {
        "command": "PYTHONPATH=$PWD python benchmarks/streaming.py --s3 " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "s3"),
        "args": vars(args),
        "loader_rows_per_s": loader_rows_s,
        "loader_s": lt,
        "ratio_loader_s3_cold_over_local": loader_rows_s["S3 cold (downloading)"] / loader_rows_s["local disk"],
        "ratio_loader_s3_warm_over_local": loader_rows_s["S3 warm (read-through copy)"] / loader_rows_s["local disk"],
        "step_s": times,
        "median_step_s": step,
        "ratio_step_s3_over_local": step["S3 warm"] / step["local disk"],
        "s3_requests": requests,
    }
    path = C.save("streaming_s3", res)
    for k, v in loader_rows_s.items():
        print(f"loader {k}: {v:,.0f} rows/s")
    print(f"step time: local {step['local disk']:.3f} s, S3 warm {step['S3 warm']:.3f} s, ratio {res['ratio_step_s3_over_local']:.3f}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
