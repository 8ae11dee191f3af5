"""The learning curve's picture (learning_curve.png in the head folder)."""

from __future__ import annotations

import math
from pathlib import Path


def plot_learning_curve(curve: list[dict], path: Path, title: str, *, alpha: float, targets: str = "rollouts") -> None:
    """Held-out Spearman and top-1 agreement against the number of training states (a PNG)."""
    from matplotlib.figure import Figure

    def points(key: str) -> list[float]:
        return [math.nan if c["heldout"][key] is None else c["heldout"][key] for c in curve]

    sizes = [c["train_states"] for c in curve]
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axes = figure.subplots()
    axes.plot(sizes, points("spearman_mean"), "o-", label=f"Spearman (head vs the {targets} targets)")
    axes.plot(sizes, points("top1_agreement"), "s-", label=f"top-1 agreement at alpha={alpha:g}")
    axes.axhline(
        curve[-1]["heldout"]["sft_top1_agreement"], color="grey", linestyle=":", label="top-1 agreement of SFT greedy"
    )
    axes.set_xscale("log")
    axes.minorticks_off()
    axes.set_xticks(sizes, [str(s) for s in sizes])
    axes.set_xlabel("training states")
    axes.set_ylabel(f"held-out ({curve[-1]['heldout']['states']} states)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=100)
