"""Routers judged against ground truth: planted teachers whose quality per row is known.

    python benchmarks/router_truth.py                                   # defaults below (< 1 h on 2 cores)
    python benchmarks/router_truth.py --routers oracle,fixed,min-ce --scenario corrupted-k3 --seeds 0
    python benchmarks/router_truth.py --scenario all --seeds 0,1,2      # the full grid (hours on a CPU)
    python benchmarks/router_truth.py --scenario all --report-only --import old/results.json   # tables over runs made elsewhere

Every teacher is the same real model (SmolLM2 by default) on the same GSM8K rows; what differs
is the trace it reads. A *good* teacher on a row reads that row's gold trace; a *bad* one reads
the trace of a different row (fluent, confident and wrong). Scenarios (``--scenario``):

- ``corrupted-kK`` (K = 2, 3, 4): teachers 0..K-2 good everywhere, teacher K-1 bad everywhere.
- ``complementary-k2``: rows split by their number of reasoning steps (the shorter half = X,
  the longer half = Y); teacher 0 good on X and bad on Y, teacher 1 the reverse.
  ``complementary-k3-good`` / ``-k3-bad`` add a third teacher good / bad everywhere.
- ``graded-pP`` (P = 25, 50, 75): teacher 0 good everywhere, teacher 1 bad on a known P% of
  the rows (nested: the rows of p = 0.25 are among those of 0.5).
- ``distinct-k3``: two good teachers that are *not* copies of each other, and one bad one:
  teacher 0 reads the gold natural-language trace, teacher 1 the same row's gold calculator
  equations (``<<48/2=24>>`` per step, the GSM8k-Aug / iCoT style), teacher 2 another row's
  trace. In ``corrupted-k3`` the two good teachers read the same text, so their caches are
  identical and any agreement rule (``govern``, ``grad-cosine``) finds them trivially; here
  agreement has to survive two different ways of writing the same correct reasoning.

A bad row reads the trace of its image under one fixed derangement of the training rows
(seeded, no fixed point). Each distinct teacher (its source row per training row) is written
once as a trace file (the format of ``kvkd.traces``, as ``kvkd generate`` writes them: per
row its own id, question and gold answer, and as ``trace`` the planted one; the header names
the planted teacher and the real GSM8K rows it covers) and extracted once (``kvkd extract
--trace FILE --keep all``: every row reads its planted trace, whatever its answer), so caches
are shared across scenarios, routers and seeds and each records its trace file's identity
(hash, planted teacher). The data-set fingerprint covers (id, question, answer) only and is
the real rows', so these caches combine in training. Each scenario's
truth is a sidecar ``truth.json`` (format ``kvkd-router-truth/1``, see
``kvkd.train.routers.truth``) beside the planted files: per row, which teachers are good and
whose trace each read. The ``oracle`` router reads it.

Per router, scenario and seed it trains a latent student (``--log-row-weights``) and reports:

- routing accuracy per step: the mean, over the step's samples, of the weight the router gave
  to the teachers good on that sample (1.0 = perfect; uniform weights score the share of good
  teachers, 1/K with one good teacher of K), and at the end: the mean over the last epoch's
  steps (every training row once);
- the student's held-out gold-answer NLL (nats/token, teacher-forced, on ``--eval-rows`` GSM8K
  train rows after the training rows).

``govern`` and ``grad-cosine`` need K >= 3 to discriminate (with two teachers the pairwise
signal is symmetric), so they run only in scenarios with K >= 3. Outputs (``--out``, default
``benchmarks/results/router_truth``): ``results.md``, ``results.csv``, ``results.json`` (every
run, per-step accuracies, load averages) and per scenario ``<scenario>.png`` (accuracy over
steps per router; final NLL per router with error bars over seeds). Finished runs are kept in
the work folder and not rerun; ``--import`` adds the runs of an earlier ``results.json`` made
with the same settings (each marked ``imported_from``), so a table can combine pieces run at
different times or on different machines.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SCENARIOS = (
    "corrupted-k2", "corrupted-k3", "corrupted-k4",
    "complementary-k2", "complementary-k3-good", "complementary-k3-bad",
    "graded-p25", "graded-p50", "graded-p75", "distinct-k3",
)
DEFAULT_SCENARIOS = ("corrupted-k3", "complementary-k2", "graded-p50")
NEEDS_K3 = ("govern", "grad-cosine")  # pairwise agreement: symmetric, hence blind, with two teachers
DERANGEMENT_SEED = 0


@dataclass
class Scenario:
    """A planted scenario over N training rows.

    Attributes:
        name: e.g. ``corrupted-k3``.
        sources: K lists of N row indices: teacher k reads, on row n, the trace of row sources[k][n].
        teachers: K short names (``good``, ``bad``, ``good-on-X`` ...).
        kinds: K trace kinds (``nl``: the row's CoT; ``equations``: its calculator equations,
            one per line); None = ``nl`` for every teacher.
    """

    name: str
    sources: list[list[int]]
    teachers: list[str]
    kinds: list[str] | None = None

    @property
    def trace_kinds(self) -> list[str]:
        """The K trace kinds (``nl`` where :attr:`kinds` is None)."""
        return list(self.kinds) if self.kinds is not None else ["nl"] * len(self.sources)

    @property
    def good(self) -> list[list[bool]]:
        """N rows of K booleans: teacher k read row n's own trace."""
        N = len(self.sources[0])
        return [[self.sources[k][n] == n for k in range(len(self.sources))] for n in range(N)]


def derangement(n: int, seed: int = DERANGEMENT_SEED) -> list[int]:
    """A permutation of range(n) without fixed points (one random cycle through all rows).

    Raises:
        ValueError: n < 2.
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 rows, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out = [0] * n
    for i, row in enumerate(order):
        out[row] = order[(i + 1) % n]
    return out


def plant(name: str, steps_per_row: list[int], seed: int = DERANGEMENT_SEED) -> Scenario:
    """The planted scenario ``name`` over N rows, N = len(steps_per_row).

    Args:
        name: one of :data:`SCENARIOS`.
        steps_per_row: number of reasoning steps of each training row (splits complementary's
            categories: the shorter half of the rows, ties broken by row order, is X).
        seed: seed of the derangement and of graded's corrupted rows.
    Raises:
        ValueError: unknown scenario name (lists them).
    """
    N = len(steps_per_row)
    gold, bad = list(range(N)), derangement(N, seed)
    mix = lambda rows_bad: [bad[n] if n in rows_bad else n for n in range(N)]  # noqa: E731
    kind, _, arg = name.partition("-")
    if kind == "corrupted" and arg in ("k2", "k3", "k4"):
        K = int(arg[1:])
        return Scenario(name, [gold] * (K - 1) + [bad], ["good"] * (K - 1) + ["bad"])
    if kind == "complementary" and arg in ("k2", "k3-good", "k3-bad"):
        by_steps = sorted(range(N), key=lambda n: (steps_per_row[n], n))
        X, Y = set(by_steps[: N // 2]), set(by_steps[N // 2:])
        sources, names = [mix(Y), mix(X)], ["good-on-X", "good-on-Y"]
        if arg == "k3-good":
            sources, names = sources + [gold], names + ["good"]
        elif arg == "k3-bad":
            sources, names = sources + [bad], names + ["bad"]
        return Scenario(name, sources, names)
    if kind == "graded" and arg in ("p25", "p50", "p75"):
        p = int(arg[1:]) / 100
        order = torch.randperm(N, generator=torch.Generator().manual_seed(seed + 1)).tolist()
        return Scenario(name, [gold, mix(set(order[: round(p * N)]))], ["good", f"bad-on-{arg[1:]}%"])
    if kind == "distinct" and arg == "k3":
        return Scenario(name, [gold, gold, bad], ["good", "good-equations", "bad"], ["nl", "equations", "nl"])
    raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)} or all")


def reasoning_steps(example) -> int:
    """Number of reasoning steps of a row: its non-empty CoT lines."""
    return sum(1 for line in example.cot.split("\n") if line.strip())


def planted_trace(example, kind: str = "nl") -> str:
    """The text a planted teacher reads from ``example``: its CoT (``nl``), or its calculator
    equations one per line (``equations``, ``<<48/2=24>>``; one per line so that extraction's
    drop-last-step removes the last equation as it removes the last CoT line).

    Raises:
        ValueError: unknown kind, or a row without equations.
    """
    if kind == "nl":
        return example.cot
    if kind == "equations":
        if not example.equations:
            raise ValueError(f"row {example.id!r} has no calculator equations; the distinct scenario needs GSM8K rows with them")
        return "\n".join(f"<<{eq}>>" for eq in example.equations)
    raise ValueError(f"unknown planted trace kind {kind!r}; choose nl or equations")


def planted_header(examples: list, sources: list[int], data: dict, seed: int = DERANGEMENT_SEED, kind: str = "nl") -> dict:
    """The trace-file header of a planted teacher: which trace each row reads (a hash of its
    source rows and trace kind, how many read their own), over the real rows ``data`` (source,
    format, split, offset, rows; the fingerprint is computed here)."""
    from kvkd.data import dataset_fingerprint

    # an nl teacher's name is the hash of its sources alone (the names of the caches written before kinds existed)
    key = sources if kind == "nl" else {"sources": sources, "kind": kind}
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    own = sum(s == n for n, s in enumerate(sources))
    return {"kvkd_traces": 1,
            "teacher": {"spec": f"planted-{digest}", "source": "benchmarks/router_truth.py", "own_rows": own, "rows": len(sources),
                        "derangement_seed": seed, "sources_sha256": digest, **({"trace_kind": kind} if kind != "nl" else {})},
            "engine": {"name": "planted", "version": "router_truth 1 (another row's gold trace on the bad rows)"},
            "sampling": {"samples": 1, "seed": seed},
            "prompt": {"template": None, "chat_template": False, "answer_check": "numeric"},
            "data": {**data, "rows": len(examples), "fingerprint": dataset_fingerprint(examples)}}


def write_planted(folder: Path, examples: list, scenario: Scenario, data: dict | None = None) -> tuple[list[Path], Path]:
    """Write one trace file per distinct teacher of the scenario (named by its source rows) and
    the scenario's ``truth.json`` beside them.

    Args:
        examples: the N training rows (the first rows of ``data``).
        data: the real rows' record for the header (``source``, ``format``, ``split``, ``offset``).
    Returns:
        (K trace files in teacher order, the truth file).
    """
    from kvkd.traces import TraceWriter
    from kvkd.train.routers.truth import write_truth

    data = {"source": None, "format": "jsonl", "split": None, "offset": 0, **(data or {})}
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for src, kind in zip(scenario.sources, scenario.trace_kinds):
        header = planted_header(examples, src, data, kind=kind)
        path = folder / f"{header['teacher']['spec']}.traces.jsonl"
        if not path.exists():  # written beside its name, then renamed: a kill leaves no partial file under it
            tmp = path.with_name(f".{path.name}.tmp")
            writer = TraceWriter(tmp, header, overwrite=True)
            writer.append([{"row": data["offset"] + n, "id": ex.id, "sample": 0, "question": ex.question, "gold": ex.answer, "gold_cot": ex.cot,
                            "completion": f"{planted_trace(examples[s], kind)}\nThe answer is: {examples[s].answer}", "trace": planted_trace(examples[s], kind),
                            "answer": examples[s].answer, "correct": examples[s].answer == ex.answer, "finish": "stop", "prompt_tokens": 0, "tokens": 0}
                           for n, (ex, s) in enumerate(zip(examples, src))])
            writer.finish(len(examples), 1)
            tmp.replace(path)
        files.append(path)
    ids = [ex.id for ex in examples]
    trace_from = [[ids[src[n]] for src in scenario.sources] for n in range(len(ids))]
    truth = write_truth(folder / f"{scenario.name}.truth.json", ids, scenario.good, scenario.teachers, scenario.name, trace_from)
    return files, truth


def extract_planted(files: list[Path], work: Path, model: str, slots: int, batch_size: int = 8) -> list[str]:
    """Extract (once) the cache of each planted trace file with teacher ``model`` (``kvkd extract
    --trace FILE --keep all``); returns the cache URLs."""
    from kvkd.cache.reader import CacheReader
    from kvkd.models import load_model
    from kvkd.pipeline.extract import ExtractConfig, extract

    urls, loaded = [], None
    for f in files:
        url = str(work / f"{f.name.removesuffix('.traces.jsonl')}-M{slots}.zarr")
        try:
            CacheReader.open(url)
        except Exception:  # noqa: BLE001 - missing or incomplete: (re)extract
            print(f"  [{time.strftime('%H:%M:%S')}] extracting {f.name}", file=sys.stderr, flush=True)
            loaded = loaded or load_model(model)  # loaded once, only when a cache is missing
            extract(ExtractConfig(model=model, trace=str(f), keep="all", fallback="gold", out=url, slots=slots, batch_size=batch_size, overwrite=True), loaded=loaded)
        urls.append(url)
    return urls


def accuracy_per_step(log_path: Path, good: torch.Tensor) -> list[float]:
    """Routing accuracy of every logged step (``row_weights`` entries of a ``log.jsonl``)."""
    from kvkd.train.routers.truth import routing_accuracy

    out = []
    for line in log_path.read_text().splitlines():
        rw = json.loads(line)["row_weights"]
        acc = routing_accuracy(torch.tensor(rw["weights"]), good[torch.tensor(rw["rows"])])
        out.append(float(acc.nanmean()))
    return out


def nll_signal(caches: list[str], good: torch.Tensor) -> dict:
    """How well the caches' gold-answer NLL alone tells good from bad teachers, on the rows
    where the scenario has both: the share of rows where a good teacher has the strictly
    lowest NLL, and the mean margin (lowest bad minus lowest good NLL, nats of the whole answer)."""
    from kvkd.cache.reader import CacheReader

    nll = torch.stack([torch.from_numpy(r.column("answer_nll") * r.column("answer_len")) for r in map(CacheReader.open, caches)], 1).double()
    mixed = good.any(1) & ~good.all(1)
    inf = torch.tensor(float("inf"), dtype=nll.dtype)
    g, b = torch.where(good, nll, inf).min(1).values[mixed], torch.where(~good, nll, inf).min(1).values[mixed]
    return {"rows": int(mixed.sum()), "good_lowest": float((g < b).double().mean()), "margin_nats": float((b - g).mean())}


@torch.no_grad()
def heldout_nll(student, examples: list, batch_size: int = 8) -> float:
    """Mean teacher-forced gold-answer NLL (nats/token) of the student on held-out rows."""
    from kvkd.train.loader import collate, tokenize_student

    tok, nlls = student.tokenizer, []
    for i in range(0, len(examples), batch_size):
        items = [{"index": 0, "teachers": [], **vars(tokenize_student(tok, ex, student.template))} for ex in examples[i : i + batch_size]]
        b = collate(items, tok.pad_token_id)
        nlls += student(b["q_ids"], b["q_mask"], b["s_ids"], b["s_mask"], b["answer_start"]).answer_nll.tolist()
    return sum(nlls) / len(nlls)


def run_one(router: str, scenario: Scenario, caches: list[str], truth: Path, seed: int, args, run_dir: Path, eval_examples: list) -> dict:
    """Train one router on one scenario and seed (or read the finished result); returns the result dict."""
    from kvkd.train.trainer import TrainConfig, load_run, train

    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    opts = {"truth": str(truth)} if router == "oracle" else {}
    cfg = TrainConfig(caches=caches, out=str(run_dir), student=args.student, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      warmup_steps=1, lora_r=args.lora_r, num_workers=0, save_every=0, keep_checkpoints=1, seed=seed, router=router,
                      router_options=opts, log_row_weights=True)
    load0 = list(os.getloadavg())
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    acc = accuracy_per_step(run_dir / "log.jsonl", torch.tensor(scenario.good))
    per_epoch = math.ceil(args.rows / args.batch_size)
    student, _ = load_run(run_dir)
    result = {"router": router, "scenario": scenario.name, "seed": seed, "accuracy_per_step": acc,
              "final_accuracy": statistics.fmean(acc[-per_epoch:]), "heldout_nll": heldout_nll(student, eval_examples),
              "train_wall_s": wall, "load_avg_before": load0, "load_avg_after": list(os.getloadavg())}
    for ckpt in (run_dir / "checkpoints").glob("step-*"):  # keep the log and the result, not the weights
        for f in ckpt.iterdir():
            f.unlink()
        ckpt.rmdir()
    done.write_text(json.dumps(result, indent=1))
    return result


def mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), float("nan"))


def write_tables(out: Path, results: list[dict], routers: list[str], scenarios: dict[str, int], header: str) -> Path:
    """``results.md`` (accuracy and NLL tables, router x scenario, mean +- std over seeds) and ``results.csv``.

    Args:
        scenarios: scenario name -> K (its number of teachers).
    """
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        cells.setdefault((r["router"], r["scenario"]), []).append(r)
    rows_csv, md = [], [header, ""]
    for metric, title, fmt in (("final_accuracy", "Routing accuracy at the end (last epoch; 1.0 = perfect)", "{:.3f} ± {:.3f}"),
                               ("heldout_nll", "Held-out gold-answer NLL (nats/token, lower is better)", "{:.3f} ± {:.3f}")):
        md += [f"### {title}", "", "| router | " + " | ".join(scenarios) + " |", "|---" * (len(scenarios) + 1) + "|"]
        for router in routers:
            line = []
            for s in scenarios:
                got = [c[metric] for c in cells.get((router, s), [])]
                cell = fmt.format(*mean_std(got)) if len(got) > 1 else (f"{got[0]:.3f} (1 seed)" if got else None)
                line.append(cell or ("n/a (K=2)" if router in NEEDS_K3 and scenarios[s] < 3 else "–"))
            md.append(f"| {router} | " + " | ".join(line) + " |")
        md.append("")
    for (router, s), got in sorted(cells.items()):
        acc, nll = mean_std([c["final_accuracy"] for c in got]), mean_std([c["heldout_nll"] for c in got])
        rows_csv.append({"router": router, "scenario": s, "seeds": len(got), "accuracy_mean": acc[0], "accuracy_std": acc[1],
                         "heldout_nll_mean": nll[0], "heldout_nll_std": nll[1]})
    (out / "results.md").write_text("\n".join(md) + "\n")
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows_csv[0]) if rows_csv else ["router"])
        w.writeheader()
        w.writerows(rows_csv)
    return out / "results.md"


def plot(out: Path, results: list[dict], routers: list[str], scenario: str) -> Path:
    """``<scenario>.png``: routing accuracy over steps per router (mean over seeds); final NLL per router (+- std)."""
    def draw(axes):
        import matplotlib

        ax1, ax2 = axes
        names, nll_m, nll_s = [], [], []
        colours = matplotlib.colormaps["tab20"]  # 13+ routers: tab10 would repeat colours
        for i, router in enumerate(routers):
            got = [r for r in results if r["router"] == router and r["scenario"] == scenario]
            if not got:
                continue
            curve = torch.tensor([r["accuracy_per_step"] for r in got]).mean(0)
            ref = router in ("oracle", "fixed")
            ax1.plot(range(1, len(curve) + 1), curve.tolist(), label=router, lw=2.5 if ref else 1.2, ls="--" if ref else "-", color=colours(i % 20))
            m, s = mean_std([r["heldout_nll"] for r in got])
            names.append(router), nll_m.append(m), nll_s.append(s)
        ax1.set(xlabel="step", ylabel="routing accuracy", title=f"{scenario}: weight on good teachers", ylim=(-0.02, 1.02))
        ax1.legend(fontsize=7, ncol=2)
        ax2.bar(names, nll_m, yerr=nll_s, capsize=3)
        lo = min(m - s for m, s in zip(nll_m, nll_s)) if names else 0
        ax2.set(ylabel="held-out answer NLL (nats/token)", title=f"{scenario}: student NLL (mean ± std over seeds)", ylim=(max(0, lo - 0.1), None))
        ax2.tick_params(axis="x", labelsize=7, rotation=35)

    path = C.figure(scenario, draw, ncols=2, folder=out)
    return path


SETTINGS = ("teacher", "student", "data", "rows", "eval_rows", "slots", "steps", "batch_size", "lr", "lora_r")  # what a run's result depends on


def import_results(path: Path, args, fingerprint: str, runs: Path) -> int:
    """Seed the work folder with the finished runs of an earlier ``results.json`` (so a table can
    combine runs made at other times or on other machines without retraining them).

    Each run is written as ``runs/<tag>/<scenario>/<router>/seed<S>/result.json`` with
    ``imported_from`` set, unless that run is already there. Returns how many were written.

    Raises:
        ValueError: the file is not a results.json of this benchmark, or its settings
            (:data:`SETTINGS`) differ from this call's (names the first that differs). The data
        is compared by the fingerprint of its rows (``data_fingerprint``) where the file
        records one, else by its resolved path.
    """
    try:
        got = json.loads(path.read_text())
        old, results = got["args"], got["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--import {path}: not a results.json of this benchmark ({e})") from None
    for key in SETTINGS:
        mine, theirs = getattr(args, key), old.get(key)
        if key == "data":
            if "data_fingerprint" in got:
                mine, theirs = fingerprint, got["data_fingerprint"]
            else:
                mine, theirs = str(Path(mine).resolve()), str(Path(theirs).resolve()) if theirs else theirs
        if mine != theirs:
            raise ValueError(f"--import {path}: its runs used --{key.replace('_', '-')} {theirs}, this call {mine}; "
                             "give the same settings or leave the file out")
    written = 0
    for r in results:
        done = runs / r["scenario"] / r["router"] / f"seed{r['seed']}" / "result.json"
        if not done.is_file():
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps({**r, "imported_from": r.get("imported_from", str(path))}, indent=1))
            written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    from kvkd.data import dataset_fingerprint, load_examples
    from kvkd.train.routers import ROUTERS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routers", default="all", help="comma-separated router names, or all (every registered router)")
    ap.add_argument("--scenario", default=",".join(DEFAULT_SCENARIOS), help=f"comma-separated scenarios, or all ({', '.join(SCENARIOS)})")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--teacher", default="smollm2", help="the teacher model every planted teacher runs")
    ap.add_argument("--student", default="smollm2")
    ap.add_argument("--data", default=str(C.DATA), help="GSM8K rows (normalised JSONL)")
    ap.add_argument("--rows", type=int, default=16, help="training rows (the data's first rows)")
    ap.add_argument("--eval-rows", type=int, default=8, help="held-out rows (right after the training rows)")
    ap.add_argument("--slots", type=int, default=4, help="M, KV slots per (layer, head) = latent thoughts")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default=str(C.RESULTS / "router_truth"), help="tables and plots")
    ap.add_argument("--work", default=str(C.WORK / "router_truth"), help="planted data, caches and runs (reused)")
    ap.add_argument("--report-only", action="store_true", help="train nothing: tables and plots from the finished runs (missing cells show as –)")
    ap.add_argument("--import", dest="imports", action="append", default=[], metavar="RESULTS_JSON",
                    help="first add the runs of an earlier results.json made with the same settings (repeatable; runs already here are kept)")
    args = ap.parse_args(argv)

    known = ROUTERS.names()
    routers = known if args.routers == "all" else [r.strip() for r in args.routers.split(",") if r.strip()]
    scenarios = list(SCENARIOS) if args.scenario == "all" else [s.strip() for s in args.scenario.split(",") if s.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2", file=sys.stderr)
        return 2
    for r in routers:
        if r not in known:
            print(f"--routers: unknown router {r!r}; known: {', '.join(known)}", file=sys.stderr)
            return 2
    for s in scenarios:
        if s not in SCENARIOS:
            print(f"--scenario: unknown scenario {s!r}; choose from {', '.join(SCENARIOS)} or all", file=sys.stderr)
            return 2
    routers = [r for r in ("oracle", "fixed") if r in routers] + [r for r in routers if r not in ("oracle", "fixed")]
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    rows = load_examples(args.data, fmt="jsonl", limit=args.rows + args.eval_rows).examples
    train_rows, eval_rows = rows[: args.rows], rows[args.rows :]
    fingerprint = dataset_fingerprint(rows)
    tag = f"n{args.rows}-M{args.slots}-s{args.steps}-b{args.batch_size}-r{args.lora_r}-{args.student}"
    for path in args.imports:
        try:
            n = import_results(Path(path), args, fingerprint, work / "runs" / tag)
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
        print(f"  imported {n} runs from {path}", file=sys.stderr, flush=True)
    t0, load0 = time.time(), list(os.getloadavg())
    planted = {}
    for s in scenarios:
        scenario = plant(s, [reasoning_steps(ex) for ex in train_rows])
        files, truth = write_planted(work / f"planted-n{args.rows}", train_rows, scenario, {"source": str(Path(args.data).resolve()), "format": "jsonl"})
        planted[s] = (scenario, extract_planted(files, work, args.teacher, args.slots), truth)
    results = []
    for s in scenarios:
        scenario, caches, truth = planted[s]
        for router in routers:
            if router in NEEDS_K3 and len(caches) < 3:
                continue
            for seed in seeds:
                run_dir = work / "runs" / tag / s / router / f"seed{seed}"
                if args.report_only:
                    if (run_dir / "result.json").is_file():
                        results.append(json.loads((run_dir / "result.json").read_text()))
                    continue
                print(f"  [{time.strftime('%H:%M:%S')}] {s} {router} seed {seed}", file=sys.stderr, flush=True)
                results.append(run_one(router, scenario, caches, truth, seed, args, run_dir, eval_rows))
        if any(r["scenario"] == s for r in results):
            plot(out, results, routers, s)
    loads = [r["load_avg_before"][0] for r in results] or [float("nan")]
    command = "python benchmarks/router_truth.py " + " ".join(argv if argv is not None else sys.argv[1:])
    n_imported = sum("imported_from" in r for r in results)
    imported = f" ({n_imported} of them imported from {', '.join(args.imports)})" if n_imported else ""
    header = (f"Command: `{command.strip()}`  \nSettings: teacher {args.teacher}, student {args.student}, {args.rows} training rows, "
              f"{args.eval_rows} held-out rows, M = {args.slots}, {args.steps} steps of batch {args.batch_size}, LoRA r {args.lora_r}, "
              f"lr {args.lr}, torch threads {args.threads}, seeds {seeds}. {len(results)} runs{imported}, training wall {sum(r['train_wall_s'] for r in results):.0f} s "
              f"in all (this call {time.time() - t0:.0f} s); 1-min load average at the start of the runs {min(loads):.1f}-{max(loads):.1f} on "
              f"{os.cpu_count()} cores (a shared machine).")
    signal = {s: nll_signal(planted[s][1], torch.tensor(planted[s][0].good)) for s in scenarios}
    header += "\n\nCached-NLL signal (rows with both good and bad teachers: share where a good teacher has the lowest cached answer NLL; mean margin): " + "; ".join(
        f"{s} {v['good_lowest']:.2f} over {v['rows']} rows, {v['margin_nats']:+.2f} nats" for s, v in signal.items()) + "."
    md = write_tables(out, results, routers, {s: len(planted[s][1]) for s in scenarios}, header)
    (out / "results.json").write_text(json.dumps({"command": command.strip(), "args": vars(args), "data_fingerprint": fingerprint, "machine": C.machine(), "wall_s": time.time() - t0,
                                                  "load_avg_start": load0, "nll_signal": signal, "results": results}, indent=1))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
