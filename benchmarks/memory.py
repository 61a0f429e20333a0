"""Peak memory and step time: CE-only student vs offline caches (K = 2, 4) vs online teachers.

    python benchmarks/memory.py               # SmolLM2 student and teachers, batch 4, 4 steps

Each configuration runs in a fresh subprocess (same student, batches, optimiser):

- ``ce``: the student alone, cross-entropy only (the baseline);
- ``offline-K``: kvkd's way, K teacher caches streamed through the training DataLoader;
- ``online-K``: the K teachers held in memory and run on every step (``online.py``).

Peak memory is measured two ways: the training process's own ``ru_maxrss`` (reported by the
child through ``resource.getrusage``), and the peak proportional set size (PSS, shared pages
split between processes) of the child and its DataLoader workers together, sampled by the
parent with psutil every 0.2 s. Target (issue 6): offline-K / ce <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time

import _common as C


def child(spec: dict) -> None:
    import torch

    from kvkd.train.trainer import TrainConfig

    cfg = TrainConfig(student=spec["student"], batch_size=spec["batch_size"])
    k = spec["teachers"]
    caches = C.teacher_copies(C.smollm2_cache(spec["rows"]), k) if k else []
    online = None
    if spec["mode"] == "online":
        from online import OnlineTeachers

        bench = C.StepBench(caches, cfg, spec["rows"])  # caches give the aligners their shapes only
        online = OnlineTeachers(["smollm2"] * k, bench.examples)
        loader = bench.loader(bench.batches(spec["steps"]), dataset=_text_only(bench))
    else:
        bench = C.StepBench(caches, cfg, spec["rows"])
        loader = bench.loader(bench.batches(spec["steps"]))
    times = []
    for step, batch in enumerate(loader):
        t = time.perf_counter()
        if online is not None:
            batch["teachers"] = online.batch(batch["index"])
        bench.step(batch, step)
        times.append(time.perf_counter() - t)
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print("RESULT " + json.dumps({"step_s": times, "ru_maxrss_mb": self_kb / 1024, "workers_ru_maxrss_mb": workers_kb / 1024, "threads": torch.get_num_threads()}))


def _text_only(bench):
    from kvkd.train.loader import DistillDataset

    return DistillDataset(bench.examples, bench.trainee.student.tokenizer, [])


def run(spec: dict, interval_s: float = 0.2) -> dict:
    import psutil

    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = {"pss": 0.0, "rss": 0.0}
    done = threading.Event()

    def sample():
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [p] + p.children(recursive=True)
                pss = rss = 0
                for q in procs:
                    try:
                        m = q.memory_full_info()
                        pss, rss = pss + m.pss, rss + m.rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                peak["pss"], peak["rss"] = max(peak["pss"], pss / 2**20), max(peak["rss"], rss / 2**20)
            except psutil.NoSuchProcess:
                break
            time.sleep(interval_s)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    done.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec} failed with code {proc.returncode}")
    res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    steps = res["step_s"][1:] or res["step_s"]  # first step is a warm-up
    return {**spec, **res, "peak_tree_pss_mb": peak["pss"], "peak_tree_rss_mb": peak["rss"], "median_step_s": C.median(steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="smollm2")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--teachers", default="2,4", help="teacher counts K to run offline and online")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    C.smollm2_cache(args.rows)  # extract once, outside the measured children
    base = {"student": args.student, "rows": args.rows, "batch_size": args.batch_size, "steps": args.steps}
    ks = [int(k) for k in args.teachers.split(",")]
    specs = [{**base, "mode": "ce", "teachers": 0}]
    for k in ks:
        specs += [{**base, "mode": "offline", "teachers": k}, {**base, "mode": "online", "teachers": k}]
    results = []
    for spec in specs:
        r = run(spec)
        results.append(r)
        print(f"{spec['mode']:8s} K={spec['teachers']}: peak PSS (all processes) {r['peak_tree_pss_mb']:,.0f} MB, "
              f"main ru_maxrss {r['ru_maxrss_mb']:,.0f} MB, step {r['median_step_s']:.2f} s")
    ce = results[0]
    for r in results:
        r["pss_over_ce"] = r["peak_tree_pss_mb"] / ce["peak_tree_pss_mb"]
        r["maxrss_over_ce"] = r["ru_maxrss_mb"] / ce["ru_maxrss_mb"]
        r["step_over_ce"] = r["median_step_s"] / ce["median_step_s"]
    path = C.save("memory", {"command": f"python benchmarks/memory.py --rows {args.rows} --batch-size {args.batch_size} --steps {args.steps} --teachers {args.teachers}",
                             "args": vars(args), "target_offline_over_ce": 1.10, "results": results})
    for r in results:
        print(f"{r['mode']:8s} K={r['teachers']}: PSS x{r['pss_over_ce']:.2f}, maxrss x{r['maxrss_over_ce']:.2f}, step x{r['step_over_ce']:.2f} of CE-only")

    def plot(ax):
        labels = [f"{r['mode']}\nK={r['teachers']}" if r["teachers"] else "CE only" for r in results]
        ax.bar(labels, [r["peak_tree_pss_mb"] for r in results], color=["C7"] + ["C0", "C3"] * len(ks))
        ax.set_ylabel("peak PSS, MB (all processes)")
        ax.set_title("training memory: offline caches vs online teachers", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)

    C.figure("memory", plot)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
