"""The whole evaluation on a started engine: the main table's and the sweep's methods run over the prompts,
their text metrics added, and the results summarised per method, on the subset that every method ran, and
as the reward-KL frontier."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from harness.metrics import add_text_metrics, coherences, summarize
from harness.plan import MethodRun, Plan, cd_partner
from harness.provenance import environment, server_settings
from harness.runner import Runner


def with_head_top_k(plan: Plan, value_head: dict | None) -> Plan:
    """``plan`` with the head's rows at the head's own k where the engine has a head (else no head rows)."""
    return dataclasses.replace(plan, head_top_k=int(value_head.get("top_k") or plan.top_k) if value_head else 0)


async def run_methods(
    runner: Runner, runs: Sequence[MethodRun], prompts: list[dict], desc: str, unit: str, progress: bool
) -> dict[str, list[dict]]:
    """Each run's responses (on its first ``prompt_limit`` prompts), by run key, one run after another."""
    records: dict[str, list[dict]] = {}
    for run in tqdm(runs, desc=desc, position=0, disable=not progress, unit=unit):
        records[run.key] = await runner.run_method(run, prompts[: run.prompt_limit])
    return records


def cd_records(run: MethodRun, runs: Sequence[MethodRun], records: dict[str, list[dict]]) -> list[dict] | None:
    """The responses a TQ* run's win-tie rate is against (CD at its alpha, among ``runs``); None otherwise."""
    partner = cd_partner(run, runs)
    return None if partner is None else records[partner]


def main_summary(
    runner: Runner, main: Sequence[MethodRun], by_method: dict[str, list[dict]], kinds: dict[str, str] | None
) -> dict[str, dict]:
    """The main table: each method's settings, metrics and decode speed, by method key."""
    reference = by_method["sft_greedy"]
    return {
        run.key: {
            "label": run.label,
            "settings": run.settings_text(kinds),
            "decoding": run.decoding,
            "temperature": run.temperature,
            **summarize(by_method[run.key], reference, cd_records(run, main, by_method)),
            **runner.timing(run),
        }
        for run in main
    }


def subset_summary(
    main: Sequence[MethodRun], by_method: dict[str, list[dict]], prompts: list[dict], kinds: dict[str, str] | None
) -> tuple[int | None, dict[str, dict]]:
    """Where some method ran on fewer prompts, every method again on exactly those prompts: (how many, the
    table); (None, {}) where every method ran on all of them."""
    limits = [run.prompt_limit for run in main if run.prompt_limit is not None and run.prompt_limit < len(prompts)]
    subset_n = min(limits) if limits else None
    if not subset_n:
        return subset_n, {}
    reference = by_method["sft_greedy"]
    ids = {p["id"] for p in prompts[:subset_n]}
    table = {}
    for run in main:
        records = [r for r in by_method[run.key] if r["prompt_id"] in ids]
        table[run.key] = {
            "label": run.label,
            "settings": run.settings_text(kinds),
            "decoding": run.decoding,
            **summarize(records, reference, cd_records(run, main, by_method)),
        }
    return subset_n, table


def reference_points(main: Sequence[MethodRun], by_method: dict[str, list[dict]], subset_ids: set[str]) -> list[dict]:
    """The frontier's SFT points (greedy and sampling) on the sweep's prompts."""
    points = []
    for run in [run for run in main if run.key in ("sft_greedy", "sft_sample")]:
        s = summarize([r for r in by_method[run.key] if r["prompt_id"] in subset_ids], by_method["sft_greedy"])
        points.append(
            {
                "key": run.key,
                "method": run.label,
                "param": None,
                "value": None,
                "mean_reward": s["mean_reward"],
                "kl": s["kl"],
                "win_rate": s["win_rate"],
                "n": s["n"],
            }
        )
    return points


def sweep_points(
    runner: Runner,
    sweep_runs: Sequence[tuple[MethodRun, str, float]],
    sweep_records: dict[str, list[dict]],
    reference: list[dict],
    kinds: dict[str, str] | None,
) -> list[dict]:
    """One frontier point per sweep run: its parameter (alpha or N), metrics and decode speed."""
    planned = [run for run, _, _ in sweep_runs]
    points = []
    for run, param, value in sweep_runs:
        s = summarize(sweep_records[run.key], reference, cd_records(run, planned, sweep_records))
        points.append(
            {
                "key": run.key,
                "method": "Best-of-N" if param == "N" else run.label,
                "param": param,
                "value": value,
                "settings": run.settings_text(kinds),
                "mean_reward": s["mean_reward"],
                "kl": s["kl"],
                "kl_truncation": s["kl_truncation"],
                "win_rate": s["win_rate"],
                "win_tie_vs_cd": s["win_tie_vs_cd"],
                "diversity": s["diversity"],
                "repetition": s["repetition"],
                "coherence": s["coherence"],
                "afinn": s["afinn"],
                "n": s["n"],
                **runner.timing(run),
            }
        )
    return points


async def evaluate(
    engine,
    settings,
    prompts: list[dict],
    plan: Plan | None = None,
    progress: bool = True,
    sweep: bool = True,
    embedder=None,
    partial_path: str | Path | None = None,
    resume: bool = True,
) -> dict:
    """The whole evaluation on an already started engine (not shut down here).

    ``partial_path``: log every finished response there, and (``resume``) reuse the ones a previous run
    logged; ``resume=False`` discards the log first. None: no log.

    Returns ``{"plan", "environment", "server_settings", "methods", "summary", "sweep", "responses",
    "sweep_responses", "seconds"}``; :func:`write_outputs` saves it and draws the frontier.
    """
    plan = plan or Plan()
    if not prompts:
        raise ValueError("no prompts to evaluate")
    started = time.perf_counter()
    runner = Runner(engine, settings, plan, progress, partial_path)
    await runner.start()
    try:
        if plan.head_top_k is None:  # the head's rows at its own k, where the engine has one
            plan = runner.plan = with_head_top_k(plan, runner.aligned.value_head)
        main = plan.main_runs()
        sweep_runs = plan.sweep_runs() if sweep and plan.sweep_prompts > 0 else []
        runner.resume([*main, *(run for run, _, _ in sweep_runs)], fresh=not resume)
        by_method = await run_methods(runner, main, prompts, "main table", "method", progress)
        subset = prompts[: plan.sweep_prompts]
        sweep_desc = f"sweep ({len(subset)} prompts)"
        sweep_records = await run_methods(runner, [r for r, _, _ in sweep_runs], prompts, sweep_desc, "point", progress)

        # Text metrics on every distinct response, once.
        all_records = [r for rs in by_method.values() for r in rs] + [r for rs in sweep_records.values() for r in rs]
        add_text_metrics(all_records, await coherences(all_records, embedder, progress))

        kinds = runner.baseline_kinds()
        summary = main_summary(runner, main, by_method, kinds)
        subset_n, subset_table = subset_summary(main, by_method, prompts, kinds)
        frontier = reference_points(main, by_method, {p["id"] for p in subset}) if sweep_runs else []
        frontier += sweep_points(runner, sweep_runs, sweep_records, by_method["sft_greedy"], kinds)
    finally:
        await runner.close()
    main_pairs = {(r["method"], r["prompt_id"]) for rs in by_method.values() for r in rs}
    return {
        "plan": dataclasses.asdict(plan),
        "environment": environment(),
        "server_settings": server_settings(settings, runner.baselines),
        "prompts": len(prompts),
        "sweep_prompt_ids": [p["id"] for p in subset] if sweep_runs else [],
        "methods": [
            {"key": r.key, "label": r.label, "settings": r.settings_text(kinds), "prompts": len(by_method[r.key])}
            for r in main
        ],
        "summary": summary,
        "subset_prompts": subset_n,
        "subset_summary": subset_table,
        "sweep": frontier,
        "responses": [r for rs in by_method.values() for r in rs],
        "sweep_responses": [
            r for rs in sweep_records.values() for r in rs if (r["method"], r["prompt_id"]) not in main_pairs
        ],
        "seconds": time.perf_counter() - started,
    }
