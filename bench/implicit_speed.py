"""TQ* with values computed inside vLLM's step, through alignd's OpenAI API, against plain decoding on the
same server, and plain decoding against a server without the baseline stack: vLLM's own load generator,
paired rounds, one script (issue 25's speed goals).

    flock /tmp/alignd-heavy.lock .venv/bin/python bench/implicit_speed.py --out /tmp/implicit-speed.json
    .venv/bin/python bench/implicit_speed.py --smoke            # checks the script, not the speed

What runs: two ``alignd serve`` processes of the embedded model with the same settings (the committed DPO
adapter as the default baseline, merged on an engine of its own; ``--head``, default the head distilled
from its implicit values, as the value head), one with the adapter also a second decoder stack of the
served engine (``ALIGND_IMPLICIT_IN_ENGINE=true``: "stack"), one without ("no stack"). Both stay up; the
load goes to one at a time. Sides, each ``vllm bench serve --backend openai-chat`` with vLLM's random
prompts sent from a file (alignd takes no ``ignore_eos``: answers may end early, so output tokens/s is
the measure), temperature 0, ``c`` at once:

  plain          no ``decoding``: SFT decoding on the stack server (the stack is skipped in steps where no
                 row asks for it)
  plain_nostack  the same on the server without the stack: what plain requests got before this feature
  implicit       ``decoding: {method: transfer_q, value: implicit, top_k: K}`` (alpha: the adapter's beta,
                 so the baseline reproduced over the top K), one engine request an answer, both stacks
                 computing every token of it
  head           ``decoding: {method: transfer_q, value: head, top_k: K}`` at the head's alpha
  rollouts       (one round, one request a stream: it is ~20x slower) rollout TQ* from the same adapter at
                 the server's defaults (k 10, one greedy 20-token rollout a candidate, alpha 1)

Rounds rotate the order of the sides; ratios are per round against the same round's ``plain`` run
(``serve_overhead.paired_rounds``), then the median over rounds. Goals: implicit >= 0.45x plain, head >=
0.9x plain, plain >= 0.95x plain_nostack, implicit >= 20x rollouts.
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

REPO = BENCH.parent
DEFAULT_HEAD = REPO / "value_heads" / "smollm2-positivity-implicit"
SIDES = ("plain", "plain_nostack", "implicit", "head", "rollouts")
GOALS = {"implicit": ("plain", 0.45), "head": ("plain", 0.9), "plain": ("plain_nostack", 0.95)}
ROLLOUT_GOAL = 20.0  # implicit TQ* at least this many times rollout TQ*'s output tokens/s


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def side_bodies(top_k: int) -> dict[str, dict | None]:
    """The ``decoding`` field each side sends (None: a plain request)."""
    return {
        "plain": None,
        "plain_nostack": None,
        "implicit": {"method": "transfer_q", "value": "implicit", "top_k": top_k},
        "head": {"method": "transfer_q", "value": "head", "top_k": top_k},
        "rollouts": {
            "method": "transfer_q",
            "value": "rollouts",
            "top_k": 10,
            "rollout_len": 20,
            "num_rollouts": 1,
            "alpha": 1.0,
        },
    }


def load_spec(args: argparse.Namespace, side: str, concurrency: int, decoding: dict | None) -> so.LoadSpec:
    per_stream = 1 if side == "rollouts" else args.prompts_per_stream
    extra = ["--extra-body", json.dumps({"decoding": decoding})] if decoding else []
    return so.LoadSpec(args.input_len, args.output_len, per_stream * concurrency, concurrency, False, extra)


def start_servers(args: argparse.Namespace, work_dir: Path, kv_gib: int) -> dict[str, so.ServerProcess]:
    common = {
        "ALIGND_BASELINE_ADAPTER": "default",
        "ALIGND_ADAPTER_SERVING": "merged",
        "ALIGND_VALUE_HEAD": str(args.head),
        "ALIGND_MAX_RUNNING_ALIGNED": "64",
        "ALIGND_MAX_QUEUED_ALIGNED": "64",
    }
    servers = {
        "stack": so.start_alignd_server(kv_gib, work_dir, extra_env={**common, "ALIGND_IMPLICIT_IN_ENGINE": "true"}),
        "nostack": so.start_alignd_server(kv_gib, work_dir, extra_env={**common, "ALIGND_IMPLICIT_IN_ENGINE": "false"}),
    }
    for name, server in servers.items():
        log(f"alignd ({name}) ready after {server.wait_ready():.0f} s: {server.base_url}")
    return servers


def measure(args: argparse.Namespace, servers: dict, model_dir: str, model_name: str, work_dir: Path) -> dict:
    """runs[concurrency][side] = the results of ``vllm bench serve``, round by round."""
    bodies = side_bodies(args.top_k)
    runs: dict[int, dict[str, list[dict]]] = {}
    for concurrency in args.concurrency:
        runs[concurrency] = {side: [] for side in args.sides}
        for r in range(1, args.rounds + 1):
            shift = (r - 1) % len(args.sides)
            for side in args.sides[shift:] + args.sides[:shift]:
                if side == "rollouts" and r > 1:
                    continue
                server = servers["nostack" if side == "plain_nostack" else "stack"]
                spec = load_spec(args, side, concurrency, bodies[side])
                if r == 1 and not args.no_warmup and side != "rollouts":
                    warm = so.LoadSpec(spec.input_len, spec.output_len, concurrency, concurrency, False, spec.extra)
                    so.run_load(
                        side,
                        server.base_url,
                        model_name,
                        model_dir,
                        warm,
                        args.seed - 1,
                        work_dir,
                        f"warmup-c{concurrency}-{side}",
                    )
                res = so.run_load(
                    side,
                    server.base_url,
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
                    f"c={concurrency} round {r}/{args.rounds} {side:13s}: {res['output_throughput']:.2f} tok/s, "
                    f"{res['mean_output_tokens']:.1f} tokens an answer, TTFT median {res['median_ttft_ms']:.0f} ms"
                )
    return runs


def summarize(runs: dict[int, dict[str, list[dict]]]) -> dict:
    out: dict = {}
    for concurrency, sides in runs.items():
        row: dict = {
            "sides": {
                side: {k: statistics.median(r[k] for r in results) for k in so.PAIRED_SIDE_METRICS}
                for side, results in sides.items()
                if results
            },
            "ratios": {},
        }
        for side, (base, goal) in GOALS.items():
            if sides.get(side) and sides.get(base):
                paired, _ = so.paired_rounds({base: sides[base], side: sides[side]}, base, side)
                row["ratios"][f"{side}/{base}"] = {
                    "ratio": paired["ratio"],
                    "per_round": paired["ratio_per_round"],
                    "goal": goal,
                    "met": paired["ratio"] >= goal,
                }
        if sides.get("rollouts") and sides.get("implicit"):
            ratio = sides["implicit"][0]["output_throughput"] / sides["rollouts"][0]["output_throughput"]
            row["ratios"]["implicit/rollouts"] = {
                "ratio": ratio,
                "per_round": [ratio],
                "goal": ROLLOUT_GOAL,
                "met": ratio >= ROLLOUT_GOAL,
            }
        out[str(concurrency)] = row
    return out


def markdown(summary: dict) -> str:
    sides = [s for s in SIDES if any(s in row["sides"] for row in summary.values())]
    lines = [
        "| c | " + " | ".join(f"{s} tok/s (tokens an answer)" for s in sides) + " |",
        "|---|" + "---|" * len(sides),
    ]
    for c, row in summary.items():
        cells = [
            f"{row['sides'][s]['output_throughput']:.2f} ({row['sides'][s]['mean_output_tokens']:.0f})"
            if s in row["sides"]
            else "-"
            for s in sides
        ]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "| c | ratio (paired, median over rounds) | per round | goal | met |", "|---|---|---|---|---|"]
    for c, row in summary.items():
        for name, r in row["ratios"].items():
            lines.append(
                f"| {c} | {name}: **{r['ratio']:.3f}x** | "
                + ", ".join(f"{x:.3f}" for x in r["per_round"])
                + f" | >= {r['goal']:g}x | {'yes' if r['met'] else 'NO'} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", type=Path, default=DEFAULT_HEAD, help="value head of both servers")
    parser.add_argument("--top-k", type=int, default=10, help="candidates of the implicit and head sides")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    add_load_arguments(parser, rounds=3, seed=3000, concurrency=[1, 8])
    args = parser.parse_args(argv)
    shrink_for_smoke(args)
    return args


def run(args: argparse.Namespace) -> dict:
    from alignd.models.loading import resolve_model_path
    from alignd.settings import Settings

    settings = Settings()
    kv_gib = args.kv_cache_gib or settings.cpu_kvcache_space_gib
    model_dir = str(resolve_model_path(settings, progress=False))
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="implicit-speed-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    log(f"head {args.head}, k {args.top_k}, sides {args.sides}; work dir {work_dir}")
    servers = start_servers(args, work_dir, kv_gib)
    try:
        runs = measure(args, servers, model_dir, settings.model_name, work_dir)
    finally:
        for server in servers.values():
            server.stop()
        log("servers stopped")
    summary = {
        "setup": {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "versions": so.versions(),
            "dtype": settings.dtype,
            "head": str(args.head),
            "top_k": args.top_k,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "prompts_per_stream": args.prompts_per_stream,
            "rounds": args.rounds,
            "kv_cache_gib": kv_gib,
        },
        "concurrency": summarize(runs),
    }
    print(f"\n{summary['setup']['machine']}; {summary['setup']['versions']}; ALIGND_DTYPE={settings.dtype}\n")
    print(markdown(summary["concurrency"]))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict:
    return so.run_unwinding_on_sigterm(run, parse_args(argv))


if __name__ == "__main__":
    main()
