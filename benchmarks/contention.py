"""Training step time with and without background load, per torch thread count and OpenMP wait policy.

    python benchmarks/contention.py                 # SmolLM2 student, 2 busy background processes

With other jobs on a 2-core machine a demo step once took 89-165 s instead of 3.8 s quiet (about
20x, where fair sharing of 2 cores between 3-4 busy processes predicts 2-4x). The suspect is
OpenMP: torch's threads spin-wait at every parallel region's barrier; when a core is taken by
another process, the thread that holds it spins while its partner waits to be scheduled. This
script measures one training step (the demo's: SmolLM2 student, LoRA, 2 teacher caches, the
similarity router, in-memory batches so that disk reads do not blur it) in a fresh process per
variant, for threads in {cores, 1} x wait policy in {OpenMP's default, PASSIVE} x {quiet, N busy
background processes}, and reports each variant's slowdown under load (loaded / quiet).

Every variant is a subprocess (the OpenMP settings are read when the runtime starts); the busy
processes are pure-Python loops, started before the variant and stopped after it, bounded in time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _busy(seconds: float) -> None:  # one background process: a core's worth of pure Python
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1


def child(args) -> None:
    """Time the demo's training step in this process and print JSON (run by the parent)."""
    import torch

    import _common as C
    from kvkd.train.options import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    caches = C.teacher_copies(C.smollm2_cache(args.rows), 2)
    bench = C.StepBench(caches, TrainConfig(student=args.student, batch_size=args.batch_size, router="similarity", num_workers=0), args.rows)
    batches = list(bench.loader(bench.batches(args.steps + 1), num_workers=0))
    t, cpu = time.perf_counter(), time.process_time()
    step_s = bench.timed_steps(batches)
    # CPU seconds this process burnt per step (all its threads): with spinning OpenMP barriers under
    # oversubscription this grows although the work per step is the same
    cpu_s = (time.process_time() - cpu) / (args.steps + 1)
    print(json.dumps({"step_s": step_s, "cpu_s_per_step": cpu_s, "threads": torch.get_num_threads(), "block_s": time.perf_counter() - t}))


def run_variant(args, threads: int, policy: str | None, load: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    env.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, str(HERE / "contention.py"), "--child", "--threads", str(threads), "--rows", str(args.rows),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--student", args.student]
    busy = [multiprocessing.Process(target=_busy, args=(args.timeout_s,), daemon=True) for _ in range(load)]
    for p in busy:
        p.start()
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout_s, cwd=HERE)
        res = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-400:]}
    except subprocess.TimeoutExpired:
        res = {"error": f"timed out after {args.timeout_s} s"}
    finally:
        for p in busy:
            p.terminate()
            p.join()
    res.update(threads_asked=threads, wait_policy=policy or "default", background=load, wall_s=time.perf_counter() - t, load_avg=list(os.getloadavg()))
    print(f"  [{time.strftime('%H:%M:%S')}] threads {threads} policy {policy or 'default'} background {load}: "
          f"{res.get('step_s', float('nan')):.2f} s/step, {res.get('cpu_s_per_step', float('nan')):.2f} CPU s/step {res.get('error', '')}", file=sys.stderr, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--student", default="smollm2")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=0, help="(child) torch threads")
    ap.add_argument("--background", default="2", help="busy background processes in the loaded runs; a comma list (2,4,8) runs each")
    ap.add_argument("--timeout-s", type=float, default=900)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    import _common as C

    C.smollm2_cache(args.rows)  # extract once, outside the measurements
    cores = os.cpu_count() or 1
    variants = [(t, p) for t in (cores, 1) for p in (None, "PASSIVE")]
    loads = [int(b) for b in str(args.background).split(",")]
    results = []
    for threads, policy in variants:  # quiet and loaded back to back, per variant
        for load in (0, *loads):
            results.append(run_variant(args, threads, policy, load))
    table = []
    for threads, policy in variants:
        for load in loads:
            q, l = (next(r for r in results if r["threads_asked"] == threads and r["wait_policy"] == (policy or "default") and r["background"] == b) for b in (0, load))
            table.append({"threads": threads, "wait_policy": policy or "default", "background": load, "quiet_step_s": q.get("step_s"), "loaded_step_s": l.get("step_s"),
                          "slowdown": (l["step_s"] / q["step_s"]) if "step_s" in q and "step_s" in l else None})
    path = C.save("contention", {"command": "python benchmarks/contention.py " + " ".join(sys.argv[1:]), "args": vars(args), "runs": results, "table": table})
    for row in table:
        print(f"threads {row['threads']} policy {row['wait_policy']:8s} background {row['background']} quiet {row['quiet_step_s']} s  loaded {row['loaded_step_s']} s  slowdown x{row['slowdown']}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
