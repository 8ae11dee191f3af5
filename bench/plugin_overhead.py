"""What alignd's vLLM plugin costs the models that do not use it: stock ``vllm serve`` of the plain model
with alignd installed (its logits processor is built into every V1 engine of the environment) against
the same server with alignd's entry points hidden, under vLLM's own load generator.

    .venv/bin/python bench/plugin_overhead.py --out /tmp/plugin-overhead.json
    .venv/bin/python bench/plugin_overhead.py --smoke          # checks the script, not the speed

What runs:
  * Two servers of the same model folder (the served model, not a value-guided folder), with alignd's
    engine flags (``bench/serve_overhead.py``'s ``engine_settings``), started side by side, each in its own
    process group: *with*, the environment as installed; *without*, the same command with
    ``bench/without_alignd_plugin`` first on ``PYTHONPATH`` (its ``sitecustomize`` hides alignd's
    ``vllm.general_plugins`` and ``vllm.logits_processors`` entry points: vLLM offers no switch for the
    latter, and a second environment would differ in more than the plugin). Before measuring, each side
    is checked to be what it claims: a request with ``vllm_xargs`` ``alignd_alpha`` is refused (400) by
    *with*, whose processor knows the key and that this model has no head, and ignored (200) by *without*.
  * Load: ``vllm bench serve`` (random dataset, ignore_eos, temperature 0), plain requests only, at each
    ``--concurrency``; one discarded warm-up per side, then ``--rounds`` rounds of *without* then *with*
    on the same prompts (a fresh dataset seed per round).

Reported per concurrency: each side's output tokens/s, TTFT and ITL medians (median over rounds), and the
paired ratio with / without (per round, then the median): 1.00 is "costs nothing". The answers of the
two sides are compared too (greedy: the plugin must not change a plain request's tokens).
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

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # bench/ is a folder of scripts: its siblings are imported by name
import serve_overhead as so  # noqa: E402
from load import add_load_arguments, shrink_for_smoke  # noqa: E402

WITHOUT_PLUGIN_PATH = BENCH / "without_alignd_plugin"
SIDES = ("without", "with")
# "costs nothing measurable": the paired ratio within the rounds' own spread of this machine
NOISE_BAND = 0.03


def log(message: str) -> None:
    print(f"[plugin_overhead {time.strftime('%H:%M:%S')}] {message}", flush=True)


def without_plugin_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(WITHOUT_PLUGIN_PATH) + (os.pathsep + path if path else "")}


def plugin_answer_status(base_url: str, model_name: str) -> int:
    """The HTTP status of a one-token request that asks for value guidance (``alignd_alpha``)."""
    body = {
        "model": model_name,
        "prompt": "Hello",
        "max_tokens": 1,
        "temperature": 0,
        "vllm_xargs": {"alignd_alpha": 1.0},
    }
    return httpx.post(base_url + "/v1/completions", json=body, timeout=120).status_code


def summarize(runs: dict[int, dict[str, list[dict]]]) -> dict:
    out = {}
    for concurrency, sides in runs.items():
        row, pairs = so.paired_rounds(sides, "without", "with")
        row["itl_diff_ms"] = statistics.median(w["median_itl_ms"] - o["median_itl_ms"] for o, w in pairs)
        changed = [s for s in (so.changed_answers(o, w) for o, w in pairs) if s is not None]
        row["same_answers"] = 1.0 - statistics.fmean(changed) if changed else None
        row["within_noise"] = abs(row["ratio"] - 1.0) <= NOISE_BAND
        out[str(concurrency)] = row
    return out


def markdown(summary: dict) -> str:
    lines = [
        "| concurrency | without plugin tok/s | with plugin tok/s | **with / without (paired)** | per round | "
        "ITL median without / with (ms) | TTFT median without / with (ms) | same greedy answers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, row in summary.items():
        o, w = row["without"], row["with"]
        same = "-" if row["same_answers"] is None else f"{row['same_answers']:.0%}"
        lines.append(
            f"| {c} | {o['output_throughput']:.1f} | {w['output_throughput']:.1f} | **{row['ratio']:.3f}x** | "
            + ", ".join(f"{x:.3f}" for x in row["ratio_per_round"])
            + f" | {o['median_itl_ms']:.1f} / {w['median_itl_ms']:.1f} | {o['median_ttft_ms']:.0f} / "
            f"{w['median_ttft_ms']:.0f} | {same} |"
        )
    ok = all(row["within_noise"] for row in summary.values())
    lines.append(f"\nwith / without within 1 +- {NOISE_BAND:.2f} at every concurrency: {'yes' if ok else 'NO'}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser, rounds=5, seed=3000, concurrency=[1, 8])
    args = parser.parse_args(argv)
    shrink_for_smoke(args)
    return args


def start_servers(model_dir: str, settings, kv_gib: int, work_dir: Path, servers: dict[str, so.ServerProcess]) -> None:
    """Both sides' ``vllm serve``, started side by side into ``servers`` (as each starts, for the caller to
    stop) and waited for."""
    servers["without"] = so.start_vllm_server(model_dir, settings, kv_gib, work_dir, extra_env=without_plugin_env())
    servers["with"] = so.start_vllm_server(model_dir, settings, kv_gib, work_dir)
    for side, server in servers.items():
        log(f"{side} plugin: ready after {server.wait_ready():.0f} s (log {server.log_path})")


def check_sides(servers: dict[str, so.ServerProcess], model_name: str) -> None:
    """Each side is what it claims: alignd's processor refuses ``alignd_alpha`` (this model has no head),
    and where it is hidden the key is ignored."""
    statuses = {side: plugin_answer_status(server.base_url, model_name) for side, server in servers.items()}
    if statuses != {"without": 200, "with": 400}:
        raise RuntimeError(
            f"the sides are not what they claim: a request with alignd_alpha got {statuses} "
            "(expected 400 where alignd's processor is loaded, 200 where it is hidden)"
        )
    log(f"checked: alignd_alpha refused with the plugin, ignored without ({statuses})")


def measure(
    args: argparse.Namespace, servers: dict[str, so.ServerProcess], model_name: str, model_dir: str, work_dir: Path
) -> dict[int, dict[str, list[dict]]]:
    """At each concurrency, one discarded warm-up run per side (unless --no-warmup), then ``args.rounds``
    rounds of without then with on the round's prompts; runs[concurrency][side] = the results of ``vllm
    bench serve``, round by round."""
    runs: dict[int, dict[str, list[dict]]] = {}
    for concurrency in args.concurrency:
        n = args.prompts_per_stream * concurrency
        spec = so.LoadSpec(args.input_len, args.output_len, n, concurrency, True, ["--save-detailed"])
        for side in SIDES if not args.no_warmup else ():
            t0 = time.perf_counter()
            warm = so.LoadSpec(spec.input_len, spec.output_len, concurrency, concurrency, True)
            so.run_load(
                side,
                servers[side].base_url,
                model_name,
                model_dir,
                warm,
                args.seed - 1,
                work_dir,
                f"warmup-c{concurrency}-{side}",
            )
            log(f"c={concurrency} warm-up {side}: {time.perf_counter() - t0:.0f} s (discarded)")
        runs[concurrency] = {side: [] for side in SIDES}
        for r in range(1, args.rounds + 1):
            for side in SIDES:
                res = so.run_load(
                    side,
                    servers[side].base_url,
                    model_name,
                    model_dir,
                    spec,
                    args.seed + r,
                    work_dir,
                    f"c{concurrency}-round{r}-{side}",
                    servers[side],
                )
                runs[concurrency][side].append(res)
                log(
                    f"c={concurrency} round {r}/{args.rounds} {side:7s}: {res['output_throughput']:.2f} tok/s, "
                    f"TTFT median {res['median_ttft_ms']:.0f} ms, ITL median {res['median_itl_ms']:.1f} ms"
                )
    return runs


def report(
    args: argparse.Namespace, runs: dict[int, dict[str, list[dict]]], settings, model_dir: str, kv_gib: int
) -> dict:
    """The summary of the runs, printed as markdown and written to --out."""
    summary = {
        "setup": {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "versions": so.versions(),
            "model_dir": model_dir,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "prompts_per_stream": args.prompts_per_stream,
            "rounds": args.rounds,
            "kv_cache_gib": kv_gib,
            "vllm_serve_flags": so.engine_settings(settings),
        },
        "concurrency": summarize(runs),
    }
    print(f"\n{summary['setup']['machine']}; {summary['setup']['versions']}")
    print(
        f"random dataset, {args.input_len} input / {args.output_len} output tokens (ignore_eos), temperature 0, "
        f"{args.prompts_per_stream} requests per stream, {args.rounds} round(s); plain requests only\n"
    )
    print(markdown(summary["concurrency"]))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    return summary


def run(args: argparse.Namespace) -> dict:
    from alignd.models.loading import resolve_model_path
    from alignd.settings import Settings

    settings = Settings()
    kv_gib = args.kv_cache_gib or settings.cpu_kvcache_space_gib
    model_dir = str(resolve_model_path(settings, progress=False))
    model_name = settings.model_name
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="plugin-overhead-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    log(f"model {model_dir}, KV cache {kv_gib} GiB each, work dir {work_dir}")

    servers: dict[str, so.ServerProcess] = {}
    try:
        start_servers(model_dir, settings, kv_gib, work_dir, servers)
        check_sides(servers, model_name)
        runs = measure(args, servers, model_name, model_dir, work_dir)
    finally:
        for server in servers.values():
            server.stop()
        if servers:
            log("servers stopped")
    return report(args, runs, settings, model_dir, kv_gib)


def main(argv: list[str] | None = None) -> dict:
    return so.run_unwinding_on_sigterm(run, parse_args(argv))


if __name__ == "__main__":
    main()
