"""The evaluation's tables (markdown: the main table, its subset, the sweep), the output files
(responses.jsonl, sweep_responses.jsonl, summary.json, the frontier plot) and the report again from a saved
summary.json."""

from __future__ import annotations

import json
from pathlib import Path

from harness.paths import DEFAULT_OUT, DEFAULT_PLOT
from harness.plots import plot_frontier


def _kl_text(s: dict) -> str:
    if s["decoding"]["method"] == "best_of_n":
        return f"{s['kl']:.3f} (bound)"
    if s["decoding"]["method"] == "sft":
        return f"{s['kl']:.3f}"
    if s["decoding"]["method"] == "baseline":
        return f"{s['kl']:.3f} (log-ratio)"
    return f"{s['kl']:.3f} ({s['kl_truncation']:.3f})"


def _number(value: float | None, digits: int = 3) -> str:
    """A table cell; "-" where a metric does not apply (or a summary from before it existed)."""
    return "-" if value is None else f"{value:.{digits}f}"


def _repetition_text(s: dict) -> str:
    return "-" if s.get("repetition") is None else f"{s['repetition']:.3f} ({s['loops']:.2f})"


# (header, cell) of the main table's columns; the full table adds tokens/s.
TABLE_COLUMNS = [
    ("method", lambda s: s["label"]),
    ("settings", lambda s: s["settings"]),
    ("prompts", lambda s: str(s["n"])),
    ("mean reward", lambda s: _number(s["mean_reward"])),
    ("win rate vs SFT greedy", lambda s: _number(s["win_rate"])),
    ("win-tie vs CD", lambda s: _number(s.get("win_tie_vs_cd"))),
    ("KL from SFT (top-k part)", _kl_text),
    ("diversity", lambda s: _number(s["diversity"])),
    ("repetition (loops)", _repetition_text),
    ("coherence", lambda s: _number(s["coherence"])),
    ("AFINN", lambda s: _number(s.get("afinn"))),
    ("AFINN win rate vs SFT greedy", lambda s: _number(s.get("afinn_win_rate"))),
    ("AFINN win-tie vs CD", lambda s: _number(s.get("win_tie_vs_cd_afinn"))),
]


def markdown_table(results: dict, subset: bool = False) -> str:
    """The main table; ``subset``: every method on the prompts that the subset-only methods ran on."""
    rows = results["subset_summary"] if subset else results["summary"]
    columns = TABLE_COLUMNS if subset else [*TABLE_COLUMNS, ("tokens/s", lambda s: _number(s["tokens_per_s"], 2))]
    lines = ["| " + " | ".join(head for head, _ in columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(cell(s) for _, cell in columns) + " |" for s in rows.values()]
    return "\n".join(lines)


def sweep_table(results: dict) -> str:
    lines = [
        "| method | parameter | mean reward | KL from SFT | KL less top-k part | win rate vs SFT greedy | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in results["sweep"]:
        param = "-" if p["param"] is None else f"{p['param']}={p['value']:g}"
        tps = f"{p['tokens_per_s']:.2f}" if "tokens_per_s" in p else "-"
        lines.append(
            f"| {p['method']} | {param} | {p['mean_reward']:.3f} | {p['kl']:.3f} | "
            f"{p['kl'] - p.get('kl_truncation', 0.0):.3f} | {p['win_rate']:.3f} | {tps} |"
        )
    return "\n".join(lines)


def write_outputs(
    results: dict, out_dir: str | Path = DEFAULT_OUT, plot_path: str | Path | None = DEFAULT_PLOT
) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "responses": out / "responses.jsonl",
        "sweep_responses": out / "sweep_responses.jsonl",
        "summary": out / "summary.json",
    }
    for key in ("responses", "sweep_responses"):
        with open(paths[key], "w") as f:
            for record in results[key]:
                f.write(json.dumps(record) + "\n")
    summary = {k: v for k, v in results.items() if k not in ("responses", "sweep_responses")}
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    if plot_path is not None and results["sweep"]:
        paths["plot"] = plot_frontier(results, plot_path)
    return paths


def replot(summary_path: str | Path, plot_path: str | Path | None) -> None:
    """Tables and the frontier again from a saved summary.json (no engine)."""
    results = json.loads(Path(summary_path).read_text())
    print(markdown_table(results))
    if results.get("subset_summary"):
        print(
            f"\nAll methods on the first {results['subset_prompts']} prompts:\n" + markdown_table(results, subset=True)
        )
    if results["sweep"]:
        print("\n" + sweep_table(results))
        if plot_path is not None:
            print(f"\nplot: {plot_frontier(results, plot_path)}")
