"""One report from two runs: a run that adds a method to an earlier evaluation, with the earlier run's rows
and sweep points that it did not make (``--combine``)."""

from __future__ import annotations

import sys


def _merged_by_key(new: list[dict], old: list[dict]) -> list[dict]:
    """``old`` with each entry of the same ``key`` in ``new`` put in its place, the rest of ``new`` after."""
    by_key = {entry.get("key"): entry for entry in new}
    kept = [by_key.get(entry.get("key"), entry) for entry in old]
    placed = {entry.get("key") for entry in old}
    return [*kept, *(entry for entry in new if entry.get("key") not in placed)]


def combine_results(results: dict, earlier: dict) -> dict:
    """This run's results with the rows of an ``earlier`` summary.json that this run did not make: a run
    that adds one method (the value head) to an evaluation of hours reports it beside the earlier rows,
    in one table and one frontier. The runs must share the prompts and the answer length; SFT greedy,
    the reference of every win rate, is in both, and the difference of its mean reward between the runs
    is recorded (it is 0 where vLLM reproduces the earlier greedy answers). ``responses`` stay this run's.
    """
    mine, theirs = results["plan"], earlier["plan"]
    problems = [
        f"{name}: this run {mine.get(name)!r}, earlier {theirs.get(name)!r}"
        for name in ("max_tokens",)
        if mine.get(name) != theirs.get(name)
    ]
    if results["prompts"] != earlier["prompts"]:
        problems.append(f"prompts: this run {results['prompts']}, earlier {earlier['prompts']}")
    if results["sweep"] and earlier["sweep"] and results["sweep_prompt_ids"] != earlier["sweep_prompt_ids"]:
        problems.append("the sweep's prompts differ (--sweep-prompts)")
    if problems:
        raise ValueError("cannot combine with the earlier run: " + "; ".join(problems))

    def merged(new: dict, old: dict) -> dict:
        """The earlier order, a row this run made again in its earlier place; this run's new rows after."""
        return {**{k: new.get(k, v) for k, v in old.items()}, **new}

    new_sweep_keys = {p["key"] for p in results["sweep"]}
    kept_rows = [k for k in earlier["summary"] if k not in results["summary"]]
    kept_points = [p for p in earlier["sweep"] if p.get("key") not in new_sweep_keys]
    reference = {
        "this_run": results["summary"]["sft_greedy"]["mean_reward"],
        "earlier": earlier["summary"]["sft_greedy"]["mean_reward"],
    }
    combined = dict(results)
    combined.update(
        summary=merged(results["summary"], earlier["summary"]),
        subset_summary=merged(results.get("subset_summary") or {}, earlier.get("subset_summary") or {}),
        subset_prompts=results.get("subset_prompts") or earlier.get("subset_prompts"),
        sweep_prompt_ids=results["sweep_prompt_ids"] or earlier["sweep_prompt_ids"],
        sweep=_merged_by_key(results["sweep"], earlier["sweep"]),
        methods=_merged_by_key(results["methods"], earlier["methods"]),
    )
    combined["combined_with"] = [
        *earlier.get("combined_with", []),
        {
            "command": earlier.get("command"),
            "date": earlier.get("environment", {}).get("date"),
            "plan": theirs,
            "rows": kept_rows,
            "sweep_points": [p.get("key") for p in kept_points],
            "sft_greedy_mean_reward": reference,
        },
    ]
    if abs(reference["this_run"] - reference["earlier"]) > 1e-9:
        print(
            f"warning: SFT greedy's mean reward differs between the runs ({reference}): the earlier rows' "
            "win rates are against the earlier reference",
            file=sys.stderr,
        )
    return combined
