"""The command line of ``eval/quality.py``: its options, the plan they make, the run on an engine of its own
(stopped cleanly on Ctrl-C or SIGTERM, resumable from the partial log) and the report it prints; and the modes
that need no engine (``--replot``, ``--plot-main``)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from harness.combine import combine_results
from harness.evaluation import evaluate
from harness.paths import DEFAULT_OUT, DEFAULT_PLOT, DEFAULT_PROMPTS, PARTIAL_LOG, REPO
from harness.plan import SWEEP_FAMILIES, Plan, load_prompts
from harness.plots import plot_main_rows
from harness.report import markdown_table, replot, sweep_table, write_outputs

# Options whose value, where given, replaces the plan's field of the same name.
PLAN_VALUES = (
    "max_tokens",
    "top_k",
    "rollout_len",
    "alpha",
    "concurrency",
    "sweep_prompts",
    "seed",
    "head_top_k",
    "implicit_top_k",
)
# Options of several values, where given, as a tuple in the plan's field of the same name.
PLAN_TUPLES = (
    "methods",
    "sweep_alphas",
    "sweep_indirect_alphas",
    "sweep_ns",
    "sweep_methods",
    "implicit_alphas",
    "head_alphas",
)


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The plan of the options: the full run's (or ``--smoke``'s) with every option given in its place."""
    plan = Plan.smoke() if args.smoke else Plan()
    overrides = {k: getattr(args, k) for k in PLAN_VALUES if getattr(args, k) is not None}
    overrides.update({k: tuple(getattr(args, k)) for k in PLAN_TUPLES if getattr(args, k)})
    if args.indirect_prompts is not None:
        overrides["indirect_prompts"] = args.indirect_prompts or None  # 0: all prompts
    if args.prune:
        overrides["prune"] = True
    if args.sweep_prompted:
        overrides["sweep_tq_prompted"] = True
    return dataclasses.replace(plan, **overrides)  # an unknown --sweep-methods name stops here (Plan checks it)


def print_report(results: dict, paths: dict[str, Path]) -> None:
    """The tables of a finished run, its times and where its files are."""
    print("\n" + markdown_table(results))
    if results["subset_summary"]:
        print(
            f"\nAll methods on the first {results['subset_prompts']} prompts:\n" + markdown_table(results, subset=True)
        )
    if results["sweep"]:
        print("\n" + sweep_table(results))
    print(
        f"\nevaluation {results['seconds']:.0f} s, "
        f"with engine start {results['wall_seconds_with_engine_start']:.0f} s; "
        + ", ".join(f"{k}: {v}" for k, v in paths.items())
    )


async def evaluate_from_args(args: argparse.Namespace) -> None:
    """The evaluation the options ask for, on an engine started (and stopped) here; its files written and
    its report printed."""
    from alignd.models.factory import open_engine
    from alignd.settings import Settings

    plan = plan_from_args(args)
    # read now: --combine may name the summary.json that this run's --out overwrites
    earlier = json.loads(Path(args.combine).read_text()) if args.combine else None
    limit = args.limit if args.limit is not None else (4 if args.smoke else None)
    prompts = load_prompts(args.prompts, limit)
    settings = Settings()
    print(f"{len(prompts)} prompts; plan: {dataclasses.asdict(plan)}", file=sys.stderr, flush=True)
    wall = time.perf_counter()
    async with open_engine(settings, progress=True) as engine:
        print(f"engine ready in {time.perf_counter() - wall:.1f} s", file=sys.stderr, flush=True)
        results = await evaluate(
            engine,
            settings,
            prompts,
            plan,
            progress=not args.quiet,
            sweep=not args.no_sweep,
            partial_path=Path(args.out) / PARTIAL_LOG,
            resume=args.resume,
        )
    results["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    results["wall_seconds_with_engine_start"] = time.perf_counter() - wall
    if earlier is not None:
        results = combine_results(results, earlier)
    plot = (
        None if args.no_plot else (args.plot or (Path(args.out) / "eval_frontier.png" if args.smoke else DEFAULT_PLOT))
    )
    print_report(results, write_outputs(results, args.out, plot))


def add_input_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The prompts, the output folder and plot, and how much of the run there is (sweep, smoke)."""
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    parser.add_argument("--limit", type=int, help="first N prompts only (smoke default: 4)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for responses.jsonl, summary.json")
    parser.add_argument("--plot", help=f"frontier PNG (default {DEFAULT_PLOT.relative_to(REPO)}; --smoke: in --out)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: checks the harness, not the methods")


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding settings of every value-guided row, and the sweep's prompts and points."""
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--rollout-len", type=int)
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--sweep-prompts", type=int)
    parser.add_argument("--sweep-alphas", type=float, nargs="+")
    parser.add_argument("--sweep-ns", type=int, nargs="+")
    parser.add_argument("--sweep-indirect-alphas", type=float, nargs="+")
    parser.add_argument("--indirect-prompts", type=int, help="TQ* indirect on the first N prompts only (0: all)")


def add_row_arguments(parser: argparse.ArgumentParser) -> None:
    """Which rows and sweep lines run (and which earlier rows are reported beside them)."""
    parser.add_argument(
        "--methods",
        nargs="+",
        help="main-table method keys (e.g. baseline_greedy tq_direct@1 "
        "tq_prompted@1 cd@1; win-tie vs CD needs the cd row); SFT greedy always runs",
    )
    parser.add_argument(
        "--head-top-k",
        type=int,
        help="k of the value-head rows (default: the head's own; 0: no head rows even where the engine has a head)",
    )
    parser.add_argument(
        "--sweep-methods",
        nargs="+",
        metavar="FAMILY",
        help=f"run these sweep lines only ({', '.join(sorted(SWEEP_FAMILIES))})",
    )
    parser.add_argument(
        "--combine",
        metavar="SUMMARY_JSON",
        help="report this run's rows together with the rows "
        "and sweep points of an earlier run's summary.json that this run did not make (same "
        "prompts and --max-tokens)",
    )
    parser.add_argument(
        "--implicit-alphas",
        type=float,
        nargs="+",
        default=(),
        help="main-table rows of TQ* with the default baseline's implicit Q at these alphas",
    )
    parser.add_argument("--implicit-top-k", type=int, help="k of the implicit rows (0: the whole vocabulary)")
    parser.add_argument(
        "--head-alphas",
        type=float,
        nargs="+",
        default=(),
        help="main-table rows of TQ* with the engine's value head at these alphas (default: --alpha)",
    )
    parser.add_argument("--sweep-prompted", action="store_true", help="TQ* from the prompted baseline in the sweep too")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """How the run goes: resumed or fresh, pruned, seeded, quiet."""
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        dest="resume",
        action="store_true",
        default=True,
        help=f"reuse the responses logged to --out/{PARTIAL_LOG} by a previous (killed) run (default)",
    )
    resume.add_argument("--fresh", dest="resume", action="store_false", help=f"discard --out/{PARTIAL_LOG} first")
    parser.add_argument(
        "--prune",
        action="store_true",
        help="skip rollouts of candidates that cannot win (same greedy answers; KL then approximate)",
    )
    parser.add_argument("--seed", type=int, help="seed sampled requests (prompt i gets seed + i); see Plan.seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_offline_arguments(parser: argparse.ArgumentParser) -> None:
    """The modes that draw or print saved runs, with no engine."""
    parser.add_argument(
        "--plot-main",
        metavar="SUMMARY_JSON",
        nargs="+",
        help="draw the main-table rows of these summaries as reward vs KL to --plot, no engine",
    )
    parser.add_argument(
        "--replot", metavar="SUMMARY_JSON", help="print the tables and redraw the plot from a saved run"
    )


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Every option, in the order ``--help`` lists them; ``description``: the script's own docstring."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_output_arguments(parser)
    add_decoding_arguments(parser)
    add_row_arguments(parser)
    add_run_arguments(parser)
    add_offline_arguments(parser)
    return parser


def _interrupted(signum, frame):
    # SIGTERM as Ctrl-C: asyncio.run cancels the run, and open_engine's exit stops the vLLM engine
    # processes (the default SIGTERM would leave them behind as orphans holding gigabytes)
    raise KeyboardInterrupt


def run_until_stopped(args: argparse.Namespace) -> None:
    """The evaluation, stopped by Ctrl-C or SIGTERM with exit status 130 (the finished responses stay in the
    partial log, and the same command resumes)."""
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        asyncio.run(evaluate_from_args(args))
    except KeyboardInterrupt:
        print(
            f"\nstopped; the finished responses are in {Path(args.out) / PARTIAL_LOG}: the same command resumes",
            file=sys.stderr,
        )
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None, description: str | None = None) -> None:
    args = build_parser(description).parse_args(argv)
    if args.replot:
        replot(args.replot, None if args.no_plot else (args.plot or DEFAULT_PLOT))
        return
    if args.plot_main:
        print(f"plot: {plot_main_rows(args.plot_main, args.plot or DEFAULT_PLOT)}")
        return
    run_until_stopped(args)
