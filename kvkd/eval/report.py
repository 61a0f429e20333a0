"""Result tables (Markdown) and training plots (PNG, matplotlib) for runs and evaluations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def results_table(results: Sequence) -> str:
    """Markdown table of EvalResults: accuracy with n and 95% Wilson interval, gold-answer NLL."""
    lines = [
        "| method | n | accuracy | 95% CI | answer NLL (nats/token) | wall (s) |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.n} | {100 * r.accuracy:.1f}% ({r.correct}/{r.n}) | "
            f"[{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}] | {r.mean_answer_nll:.3f} | {r.wall_s:.1f} |"
        )
    return "\n".join(lines)


def read_log(run_dir: str | Path) -> list[dict]:
    """The per-step entries of a run's ``log.jsonl``.

    Raises:
        FileNotFoundError: the run has no log.
    """
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a kvkd train run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


LEGACY_TERMS = ("codi", "kv", "cka")  # logs written before they listed their terms


def loss_terms(log: list[dict]) -> list[str]:
    """The distillation terms a run's log holds (each a per-teacher list per step), in log
    order: the ``terms`` its entries list (any registered term), else :data:`LEGACY_TERMS`."""
    names: list[str] = []
    for e in log:
        for name in e.get("terms") or [t for t in LEGACY_TERMS if t in e]:
            if name not in names:
                names.append(name)
    return names


def plot_run(run_dir: str | Path, out_png: str | Path) -> Path:
    """Plot a run's losses (total, CE, validation NLL if logged, every distillation term per
    teacher that is not all zero) and router weights per teacher.

    Raises:
        FileNotFoundError: the run has no log; ValueError: the log is empty.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = read_log(run_dir)
    if not log:
        raise ValueError(f"{run_dir}/log.jsonl has no steps yet")
    steps = [e["step"] for e in log]
    K = len(log[0]["weights"]) if log else 0
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, [e["loss"] for e in log], label="total")
    axes[0].plot(steps, [e["ce"] for e in log], label="CE")
    valid = [(e["step"], e["valid_nll"]) for e in log if e.get("valid_nll") is not None]
    if valid:  # --valid-data: validation gold-answer NLL
        axes[0].plot(*zip(*valid), "o-", label="validation NLL")
    axes[0].set_title("loss")
    styles = ("-", "--", ":", "-.")
    for k in range(K):
        for i, name in enumerate(loss_terms(log)):
            if any(e.get(name) and e[name][k] for e in log):  # a term that is off logs zeros
                axes[1].plot(steps, [e[name][k] if e.get(name) else float("nan") for e in log], styles[i % len(styles)], label=f"{name.upper()} t{k}")
        axes[2].plot(steps, [e["weights"][k] for e in log], label=f"teacher {k}")
    axes[1].set_title("distillation terms per teacher")
    axes[1].set_yscale("log")
    axes[2].set_title("router weight (batch mean)")
    axes[2].set_ylim(0, 1)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
