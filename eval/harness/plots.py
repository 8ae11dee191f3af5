"""The reward-KL pictures: the sweep's frontier over alpha (or N), and the main-table rows of one or more
saved runs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from harness.plan import method_family


def plot_frontier(results: dict, path: str | Path) -> Path:
    """Mean reward against KL from SFT, one line per method over its alpha (or N), in two panels: the KL
    as defined for the table, and the value-guided methods' KL without its top-k truncation part
    (KL to the SFT model restricted to the k candidates), which is what alpha moves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5.0), dpi=110, sharey=True)
    lines: dict[str, list[dict]] = {}
    for p in results["sweep"]:
        if p["param"] is not None:
            lines.setdefault(p["method"], []).append(p)
    panels = [
        (
            axes[0],
            lambda p: p["kl"],
            "KL from SFT per response (nats): sum of per-step KL;\nbest-of-N: log N - (N-1)/N bound",
        ),
        (
            axes[1],
            lambda p: p["kl"] - p.get("kl_truncation", 0.0),
            "same, less the top-k truncation part -log(SFT mass of the k candidates)",
        ),
    ]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, kl_of, xlabel in panels:
        for (method, points), marker, color in zip(lines.items(), "osD^vP", colors, strict=False):
            points = sorted(points, key=lambda p: p["value"])
            ax.plot(
                [kl_of(p) for p in points], [p["mean_reward"] for p in points], marker=marker, color=color, label=method
            )
            for p in points:
                ax.annotate(
                    f"{'α' if p['param'] == 'alpha' else 'N'}={p['value']:g}",
                    (kl_of(p), p["mean_reward"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=color,
                )
        for p, marker in zip([p for p in results["sweep"] if p["param"] is None], "*X", strict=False):
            ax.scatter([kl_of(p)], [p["mean_reward"]], marker=marker, s=120, color="black", zorder=5, label=p["method"])
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("mean target reward (VADER positivity)")
    axes[1].legend(fontsize=8, loc="best")
    plan = results["plan"]
    n = len(results["sweep_prompt_ids"])
    fig.suptitle(
        f"Reward vs KL from SFT, SmolLM2-135M-Instruct, first {n} prompts ({plan['max_tokens']} tokens, "
        f"k={plan['top_k']}, rollouts of {plan['rollout_len']} tokens, greedy decisions)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_main_rows(summary_paths: Sequence[str | Path], path: str | Path) -> Path:
    """Mean reward against KL from SFT of the main-table rows of one or more summary.json files (the same
    prompts and answer length), one marker per row, rows of one method family joined over alpha; the KL
    without its top-k truncation part beside it (what alpha moves). SFT greedy is the origin of both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a family in several summaries is several lines (another head, other settings), named by the run's folder;
    # SFT greedy, in each, is drawn once
    by_run = [(Path(p).parent.name, json.loads(Path(p).read_text())["summary"]) for p in summary_paths]
    seen: dict[str, set[str]] = {}
    for run, summary in by_run:
        for key in summary:
            seen.setdefault(method_family(key), set()).add(run)
    families: dict[str, list[tuple[str, dict]]] = {}
    for run, summary in by_run:
        for key, row in summary.items():
            family = method_family(key)
            if key == "sft_greedy" and family in families:
                continue
            name = family if len(seen[family]) == 1 or key == "sft_greedy" else f"{family} ({run})"
            families.setdefault(name, []).append((key, row))
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5.0), dpi=110, sharey=True)
    colours = plt.get_cmap("tab20").colors
    for i, (family, members) in enumerate(sorted(families.items())):
        members.sort(key=lambda kr: kr[1]["kl"])
        for ax, truncated in zip(axes, (False, True), strict=False):
            kls = [r["kl"] - ((r.get("kl_truncation") or 0.0) if truncated else 0.0) for _, r in members]
            rewards = [r["mean_reward"] for _, r in members]
            ax.plot(kls, rewards, "o-" if len(members) > 1 else "o", label=family, color=colours[i % len(colours)])
            for (key, _), x, y in zip(members, kls, rewards, strict=False):
                ax.annotate(
                    key.split("@", 1)[1] if "@" in key else "",
                    (x, y),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(4, -9),
                )
    axes[0].set_xlabel("KL from SFT (sum over the answer; best-of-N: its bound; baseline: log-ratio)")
    axes[1].set_xlabel("KL without the top-k truncation part")
    axes[0].set_ylabel("mean target reward (positivity)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"main-table rows of {', '.join(Path(p).parent.name for p in summary_paths)} (labels: alpha)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
