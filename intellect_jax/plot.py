"""`intellect-jax plot --run-dir DIR`: PNG plots of a run's metrics.jsonl (loss, throughput, sync, utilization).

The loss plot also shows the held-out loss of the global params (``kind="eval"`` rows) where the run evaluated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from intellect_jax.metrics import read_metrics


class PlotError(ValueError):
    """A run directory with nothing to plot yet."""


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the --run-dir of a run that has trained")
    records = read_metrics(path)
    inner = [r for r in records if r.get("kind") == "inner"]
    outer = [r for r in records if r.get("kind") == "outer"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not inner:
        raise PlotError(f"{path} has no training steps yet; plot once the run has logged its first step (a row "
                        'with "kind": "inner")')
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    tokens, total = [], 0.0
    for r in inner:
        total += r["tokens"]
        tokens.append(total)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(tokens, [r["loss"] for r in inner], label="loss (mean over islands)")
    if inner[0].get("loss_per_island"):
        per = list(zip(*[r["loss_per_island"] for r in inner]))
        for i, series in enumerate(per):
            ax.plot(tokens, series, lw=0.6, alpha=0.5, label=f"island {i}")
    if evals:  # at the tokens trained when each evaluation ran
        at = np.interp([r["step"] for r in evals], [r["step"] for r in inner], tokens)
        ax.plot(at, [r["eval_loss"] for r in evals], "ko-", ms=4, lw=1, label="held-out loss (global params)")
    ax.set(xlabel="tokens", ylabel="cross-entropy", title=f"loss vs tokens — {run_dir.name}")
    ax.legend(fontsize=7)
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in inner], [r["tokens_per_s"] for r in inner])
    ax.set(xlabel="inner step", ylabel="tokens / s", title="throughput")
    if any("mfu" in r for r in inner):
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in inner], [100 * r.get("mfu", 0) for r in inner], color="C1")
        ax2.set_ylabel("MFU %")
    save(fig, "throughput.png")

    if outer:
        fig, ax = plt.subplots(figsize=(7, 4))
        wait = [r.get("wait_seconds", r["sync_seconds"]) for r in outer]
        if any("fragment" in r for r in outer):  # streaming: one bar per fragment sync, coloured by fragment
            for p in sorted({r["fragment"] for r in outer}):
                rows = [(r["outer_step"], w) for r, w in zip(outer, wait) if r["fragment"] == p]
                ax.bar([x for x, _ in rows], [w for _, w in rows], color=f"C{p}", label=f"fragment {p}")
            ax.legend(fontsize=7)
        else:
            ax.bar([r["outer_step"] for r in outer], wait)
        ax.set(xlabel="outer step", ylabel="seconds", title="time the inner steps waited for each sync")
        save(fig, "sync.png")
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["outer_step"] for r in outer], [100 * r["compute_utilization"] for r in outer], marker="o")
        ax.set(xlabel="outer step", ylabel="%", ylim=(0, 105), title="compute utilization (compute / wall)")
        save(fig, "utilization.png")
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="a run directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="where to write the PNGs (default: <run dir>/plots)")


def run(args: argparse.Namespace) -> int:
    for p in plot_run(args.run_dir, args.out):
        print(p)
    return 0
