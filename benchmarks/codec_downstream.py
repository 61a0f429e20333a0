"""Compression judged by the student: the same training run on caches that differ only in codec.

    OMP_NUM_THREADS=1 python benchmarks/codec_downstream.py --rows 64 --steps 16 --batch-size 4 \
        --seeds 0,1,2 --codecs fp16,int8,int4 --heldout 32

One SmolLM2 teacher cache (the first ``--rows`` GSM8K train rows, M = ``--slots``) is extracted
once in float32, then rewritten with every codec of ``--codecs`` (same rows, same metadata:
the caches differ only in how keys/values/hidden are stored). For each seed and codec, one
``kvkd train`` run (same seed, steps, rows, batch order, router ``fixed``, K = 1; the student
is ``--student`` with LoRA) is followed by the student's teacher-forced NLL of the gold answer
(nats/token, after its latent thoughts) on ``--heldout`` GSM8K train rows the runs never saw
(from row ``--heldout-offset``). Reported per codec as mean +- std over seeds: held-out NLL,
and the training KV and hidden (CODI) losses (mean of the last ``--tail`` steps); next to
fp16, the NLL difference paired by seed. A codec is *neutral* when its mean NLL difference to
fp16 lies within the fp16 runs' seed std.

Before training, the loader's read throughput per codec (``DistillDataset`` batches of
``--batch-size`` random rows, main process, codecs alternated repeat by repeat) is measured,
since the codec's decode runs in the loader on the training hot path; it is compared with the
trainer's consumption (batch size / mean step time of the runs).

Results go to ``results/codec_downstream.json`` after every run (a partial run is usable) and
``results/codec_downstream.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import _common as C
from kvkd.cache.reader import CacheReader
from kvkd.cache.writer import RESERVED_KEYS, CacheWriter


def codec_cache(src: CacheReader, rows: dict, codec: str) -> str:
    """``src``'s rows rewritten with ``codec`` (zstd:3) under ``results/work``, once."""
    url = str(C.WORK / f"{Path(src.url).name[:-5]}-as-{codec}.zarr")
    try:
        CacheReader.open(url)
        return url
    except Exception:  # noqa: BLE001 - missing or incomplete: (re)write
        pass
    meta = {k: v for k, v in src.metadata.items() if k not in RESERVED_KEYS}
    writer = CacheWriter.open(url, src.layout, meta, codec=codec, overwrite=True)
    for shard in writer.pending_shards():
        lo, hi = writer.layout.shard_range(shard)
        writer.write_shard(shard, {k: v[lo:hi] for k, v in rows.items()})
    writer.finalize()
    return url


def loader_rows_per_s(urls: dict[str, str], examples, tokenizer, batch_size: int, batches: int, repeats: int) -> dict[str, float]:
    """Rows/s of ``DistillDataset.__getitems__`` (read + decode + tensors) per codec, alternated."""
    from kvkd.train.loader import DistillDataset

    sets = {c: DistillDataset(examples, tokenizer, [u]) for c, u in urls.items()}
    rng = np.random.default_rng(0)
    idx = [rng.choice(len(examples), batch_size, replace=False).tolist() for _ in range(batches)]
    for ds in sets.values():
        ds.__getitems__(idx[0])  # open the readers (untimed)

    def run(ds):
        def f():
            t = time.perf_counter()
            for b in idx:
                ds.__getitems__(b)
            return time.perf_counter() - t
        return f

    times = C.interleave({c: run(ds) for c, ds in sets.items()}, repeats)
    return {c: batches * batch_size / C.median(ts) for c, ts in times.items()}


@torch.no_grad()
def heldout_nll(run_dir: str, examples) -> float:
    """Mean teacher-forced NLL (nats/token) of the gold answers of ``examples`` after the trained
    student's latent thoughts (as ``kvkd eval`` computes it, without decoding)."""
    from kvkd.train.loader import collate, tokenize_student
    from kvkd.train.trainer import load_run

    student, _ = load_run(run_dir)
    tok, nlls = student.tokenizer, []
    for lo in range(0, len(examples), 8):
        items = []
        for ex in examples[lo : lo + 8]:
            st = tokenize_student(tok, ex, student.template)
            items.append({"index": 0, "q_ids": st.q_ids, "s_ids": st.s_ids, "answer_start": st.answer_start, "teachers": []})
        b = collate(items, tok.pad_token_id)
        nlls += student(b["q_ids"], b["q_mask"], b["s_ids"], b["s_mask"], b["answer_start"]).answer_nll.tolist()
    return float(np.mean(nlls))


def mean_std(xs: list[float]) -> tuple[float, float]:
    return float(np.mean(xs)), float(statistics.stdev(xs)) if len(xs) > 1 else 0.0


def summarise(runs: list[dict], codecs: list[str]) -> dict:
    """Per codec: NLL, KV and hidden loss as mean/std over seeds; NLL delta to fp16 paired by seed."""
    base = "fp16" if "fp16" in codecs else codecs[0]
    by = {c: {r["seed"]: r for r in runs if r["codec"] == c} for c in codecs}
    base_std = mean_std([r["heldout_nll"] for r in by[base].values()])[1]
    out = {}
    for c in codecs:
        rs = list(by[c].values())
        if not rs:
            continue
        paired = [by[c][s]["heldout_nll"] - by[base][s]["heldout_nll"] for s in by[c] if s in by[base]]
        d_mean, d_std = mean_std(paired) if paired else (float("nan"), float("nan"))
        out[c] = {
            "seeds": sorted(by[c]),
            "heldout_nll": mean_std([r["heldout_nll"] for r in rs]),
            "kv_loss": mean_std([r["kv_tail"] for r in rs]),
            "hidden_loss": mean_std([r["codi_tail"] for r in rs]),
            "ce": mean_std([r["ce_tail"] for r in rs]),
            "nll_delta_to_fp16": (d_mean, d_std),
            "neutral": bool(abs(d_mean) <= base_std) if paired and c != base else None,
        }
    return {"baseline": base, "baseline_seed_std": base_std, "codecs": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--slots", type=int, default=6)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--codecs", default="fp16,int8,int4")
    ap.add_argument("--student", default="smollm2")
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--heldout-offset", type=int, default=1000)
    ap.add_argument("--tail", type=int, default=4, help="last steps whose losses are averaged")
    ap.add_argument("--loader-batches", type=int, default=8)
    ap.add_argument("--loader-repeats", type=int, default=3)
    ap.add_argument("--tag", default="codec_downstream", help="name of the JSON/PNG results")
    ap.add_argument("--combine", default="", help="comma-separated result names (e.g. from runs of other seeds in parallel): "
                    "merge their runs into --tag's summary and plot, and train nothing")
    args = ap.parse_args()
    if args.combine:
        return combine(args)
    from kvkd.data import load_examples
    from kvkd.train.options import TrainConfig
    from kvkd.train.trainer import build_student, train

    codecs, seeds = args.codecs.split(","), [int(s) for s in args.seeds.split(",")]
    src = CacheReader.open(C.smollm2_cache(args.rows, args.slots, codec="float32", compressor="none"))
    rows = src.read(slice(None))
    urls = {c: codec_cache(src, rows, c) for c in codecs}
    examples = load_examples(str(C.DATA), limit=args.rows).examples
    heldout = load_examples(str(C.DATA), offset=args.heldout_offset, limit=args.heldout).examples
    res = {"command": "python benchmarks/codec_downstream.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
           "args": vars(args), "caches": urls, "runs": []}
    tok = build_student(args.student, args.slots, TrainConfig(use_lora=False)).tokenizer
    res["loader_rows_per_s"] = loader_rows_per_s(urls, examples, tok, args.batch_size, args.loader_batches, args.loader_repeats)
    print("loader rows/s:", {c: round(v, 1) for c, v in res["loader_rows_per_s"].items()}, flush=True)
    C.save(args.tag, res)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:  # seed-major: a partial run has every codec for its first seeds
            for codec in codecs:
                run_dir = f"{tmp}/{codec}-s{seed}"
                cfg = TrainConfig(caches=[urls[codec]], out=run_dir, student=args.student, steps=args.steps, batch_size=args.batch_size,
                                  lr=args.lr, warmup_steps=args.warmup_steps, seed=seed, save_every=0, keep_checkpoints=1, num_workers=1)
                t = time.perf_counter()
                summary = train(cfg)
                log = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
                tail = log[-args.tail:]
                run = {"codec": codec, "seed": seed, "heldout_nll": heldout_nll(run_dir, heldout),
                       "kv_tail": float(np.mean([s["kv"][0] for s in tail])), "codi_tail": float(np.mean([s["codi"][0] for s in tail])),
                       "ce_tail": float(np.mean([s["ce"] for s in tail])), "loss_curve": [s["loss"] for s in log],
                       "mean_step_s": summary.mean_step_s, "wall_s": time.perf_counter() - t, "load_avg": list(__import__("os").getloadavg())}
                res["runs"].append(run)
                res["summary"] = summarise(res["runs"], codecs)
                step_s = [r["mean_step_s"] for r in res["runs"]]
                res["trainer_rows_per_s"] = args.batch_size / float(np.mean(step_s))
                res["loader_over_trainer"] = {c: v / res["trainer_rows_per_s"] for c, v in res["loader_rows_per_s"].items()}
                C.save(args.tag, res)
                print(f"{codec} seed {seed}: held-out NLL {run['heldout_nll']:.4f}  kv {run['kv_tail']:.4f}  hidden {run['codi_tail']:.4f}  "
                      f"{run['mean_step_s']:.1f} s/step", flush=True)
                shutil.rmtree(run_dir, ignore_errors=True)
    report(res, codecs, args.tag)


def combine(args) -> None:
    """Merge the runs of several result files (same settings, other seeds) into ``args.tag``."""
    parts = [json.loads((C.RESULTS / f"{name}.json").read_text()) for name in args.combine.split(",")]
    res = {k: v for k, v in parts[0].items() if k not in ("benchmark", "machine")}
    res["combined_from"] = {name: {"command": p["command"], "machine": p["machine"]} for name, p in zip(args.combine.split(","), parts)}
    res["runs"] = [r for p in parts for r in p["runs"]]
    codecs = args.codecs.split(",")
    res["summary"] = summarise(res["runs"], codecs)
    res["trainer_rows_per_s"] = args.batch_size / float(np.mean([r["mean_step_s"] for r in res["runs"]]))
    res["loader_over_trainer"] = {c: v / res["trainer_rows_per_s"] for c, v in res["loader_rows_per_s"].items()}
    C.save(args.tag, res)
    report(res, codecs, args.tag)


def report(res: dict, codecs: list[str], tag: str) -> None:
    """Print the per-codec summary and plot the mean loss curves."""
    for c, s in res["summary"]["codecs"].items():
        (n, ns), (d, ds) = s["heldout_nll"], s["nll_delta_to_fp16"]
        print(f"{c:6s} seeds {s['seeds']} NLL {n:.4f} +- {ns:.4f}  delta {d:+.4f} +- {ds:.4f}  kv {s['kv_loss'][0]:.4f} +- {s['kv_loss'][1]:.4f}  "
              f"hidden {s['hidden_loss'][0]:.4f} +- {s['hidden_loss'][1]:.4f}  neutral {s['neutral']}")
    print(f"loader rows/s {res['loader_rows_per_s']}, trainer {res['trainer_rows_per_s']:.3f} rows/s")

    def plot(ax):
        for c in codecs:
            curves = np.array([r["loss_curve"] for r in res["runs"] if r["codec"] == c])
            if len(curves):
                m = curves.mean(0)
                ax.plot(np.arange(1, len(m) + 1), m, label=f"{c} (NLL {res['summary']['codecs'][c]['heldout_nll'][0]:.3f})")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over seeds)")
        ax.set_title("Same run, caches differing only in codec", fontsize=9)
        ax.legend(fontsize=7)

    C.figure(tag, plot)


if __name__ == "__main__":
    main()
