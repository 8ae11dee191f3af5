"""Serving a trained baseline adapter: as a LoRA in the served vLLM engine, or merged into a model folder
on a second engine; and TQ* from the adapter against TQ* from the prompted baseline. Same prompts, same
settings, one script, the configurations run one after the other (never two at once).

    .venv/bin/python bench/baseline_serving.py                      # all three configurations
    .venv/bin/python bench/baseline_serving.py --smoke              # a tiny run: checks the script
    .venv/bin/python bench/baseline_serving.py --configs lora none  # some of them

Configurations (each in its own process, so that engines never overlap):
  none    the served engine without LoRA, the prompted baseline only (ALIGND_BASELINE_ADAPTER=none):
          today's reference for plain requests
  lora    the served engine with LoRA on, the adapter as a LoRARequest (ALIGND_ADAPTER_SERVING=lora)
  merged  the served engine without LoRA, the adapter merged into a folder on a second engine
          (ALIGND_ADAPTER_SERVING=merged)
  implicit_in_engine  as merged, and the merged adapter also a second decoder stack of the served engine
          (ALIGND_IMPLICIT_IN_ENGINE): TQ* implicit in vLLM's step; plain requests skip the stack
  remote  the same merged folder on a ``vllm serve`` of its own (started by this script, alignd's engine
          settings), the baseline reached over HTTP (ALIGND_BASELINE_URL): remote against in-process

Measured in each, through the server's own door (``Generation.stream``), greedy, ``c`` prompts at once
(and, for TQ*, the mean latency of one rollout request to the baseline's engine, from its call meter):
  plain      SFT decoding (``method: sft``), output tokens/s: does enabling LoRA slow base requests?
  baseline   the adapter sampled itself (``method: baseline``), output tokens/s
  tq         TQ* direct (alpha 1, k 10, one greedy 20-token rollout per candidate, pruning on) from the
             default baseline (the adapter) and from the prompted baseline: output tokens/s, mean
             positivity
  tq_implicit  TQ* with the adapter's exact implicit Q (decoding.value='implicit', k 10, alpha = its beta),
             with diagnostics: alignd's step loop, two scoring requests a token (the SFT model's top-k, the
             baseline's log-probabilities); tq_implicit_engine (implicit_in_engine only): the same without
             diagnostics, computed in the engine's step (one engine request an answer)

Prints a markdown table for docs/BENCHMARKS.md; --out writes every number as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "none": {"ALIGND_BASELINE_ADAPTER": "none"},
    "lora": {"ALIGND_BASELINE_ADAPTER": "default", "ALIGND_ADAPTER_SERVING": "lora"},
    "merged": {"ALIGND_BASELINE_ADAPTER": "default", "ALIGND_ADAPTER_SERVING": "merged"},
    # as merged, plus the adapter's stack in the served engine: implicit values computed in its step
    "implicit_in_engine": {
        "ALIGND_BASELINE_ADAPTER": "default",
        "ALIGND_ADAPTER_SERVING": "merged",
        "ALIGND_IMPLICIT_IN_ENGINE": "true",
    },
    "remote": {"ALIGND_BASELINE_ADAPTER": "none"},  # + ALIGND_BASELINE_URL of the vllm serve run_config starts
}
REMOTE_NAME = "baseline-merged"
PROMPTS = [
    "Tell me about your weekend.",
    "What do you think of Mondays?",
    "Describe the weather today.",
    "How was your commute?",
    "What is your opinion of homework?",
    "Tell me about traffic jams.",
    "What do you think about rainy days?",
    "Describe a long queue at the bank.",
]
TQ = {"method": "transfer_q", "alpha": 1.0, "top_k": 10, "rollout_len": 20, "num_rollouts": 1, "prune": True}
# the adapter's exact Q (its manifest: DPO, beta 0.1), alpha = beta, the server's default k
TQ_IMPLICIT = {"method": "transfer_q", "value": "implicit", "top_k": 10}
CASES = ("plain", "baseline", "tq_adapter", "tq_implicit", "tq_implicit_engine", "tq_prompted")


async def decode(
    generation,
    engine,
    prompts: list[str],
    decoding: dict | None,
    max_tokens: int,
    calls: list[tuple[str, float]] | None = None,
) -> dict:
    """``prompts`` decoded at once through the door; output tokens/s over the wall time, the mean
    target reward when the method reports one, and the mean seconds of the baseline engine's rollout
    requests (``calls``: what its call meter reported, cleared here)."""
    from alignd.decoding.config import DecodingConfig
    from alignd.decoding.prompt import Prompt
    from alignd.models.engine import GenerationParams

    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
    # diagnostics for the mean reward, unless the case turns them off (the implicit source computes its
    # values in the engine's step only without them)
    config = DecodingConfig(**{"diagnostics": True, **decoding}) if decoding else None

    async def one(text: str) -> tuple[int, float | None]:
        chat = ({"role": "user", "content": text},)
        prompt = Prompt(tuple(engine.render_chat(list(chat))), messages=chat)
        tokens, reward = 0, None
        async for delta in generation.stream(generation.plan(prompt, params, config), "bench"):
            tokens += len(delta.token_ids)
            reward = delta.alignment.reward if delta.alignment is not None else reward
        return tokens, reward

    if calls is not None:
        calls.clear()
    start = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    seconds = time.perf_counter() - start
    tokens = sum(t for t, _ in results)
    rewards = [r for _, r in results if r is not None]
    rollouts = [s for call, s in calls or () if call == "rollouts"]
    return {
        "concurrency": len(prompts),
        "seconds": seconds,
        "output_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "mean_reward": statistics.fmean(rewards) if rewards else None,
        "rollout_call_ms": 1000 * statistics.fmean(rollouts) if rollouts else None,
        "rollout_calls": len(rollouts),
    }


async def measure(config: str, args) -> dict:
    """Every measurement of one configuration (its settings come from the environment)."""
    from alignd.decoding.generation import open_generation
    from alignd.models.factory import open_engine
    from alignd.settings import Settings

    settings = Settings()
    started = time.perf_counter()
    out: dict = {"config": config, "rows": []}
    async with open_engine(settings, progress=False) as engine, open_generation(engine, settings) as generation:
        baselines = generation.baselines
        out["start_seconds"] = time.perf_counter() - started
        out["default_baseline"] = baselines.get("default").kind
        calls: list[tuple[str, float]] = []
        baseline_engine = baselines.get("default").policy.engine
        if baseline_engine is not engine:  # its own engine (merged, remote): time its rollout requests
            baseline_engine.observe_calls(lambda call, seconds, outcome: calls.append((call, seconds)))
        await decode(generation, engine, PROMPTS[:2], None, 8)  # warm-up of both paths
        await decode(generation, engine, PROMPTS[:1], {**TQ, "baseline": "prompted"}, 2)
        cases = [("plain", "SFT decoding", None)]
        if out["default_baseline"] in ("adapter", "remote"):
            cases.append(("baseline", "the adapter sampled (method: baseline)", {"method": "baseline"}))
            cases.append(("tq_adapter", "TQ* from the adapter", {**TQ, "baseline": "default"}))
        if out["default_baseline"] == "adapter":
            cases.append(("tq_implicit", "TQ* implicit Q of the adapter", TQ_IMPLICIT))
        if config == "implicit_in_engine":
            cases.append(
                (
                    "tq_implicit_engine",
                    "TQ* implicit Q in the engine's step (no diagnostics)",
                    {**TQ_IMPLICIT, "diagnostics": False},
                )
            )
        if config not in ("merged", "implicit_in_engine", "remote"):
            # Under "merged" the SFT engine runs without LoRA, exactly as under "none", so TQ* from the
            # prompted baseline (which shares it) would measure the same thing again: not repeated.
            cases.append(("tq_prompted", "TQ* from the prompted baseline", {**TQ, "baseline": "prompted"}))
        cases = [case for case in cases if args.cases is None or case[0] in args.cases]
        for key, label, decoding in cases:
            max_tokens = args.tq_tokens if key.startswith("tq") else args.plain_tokens
            for c in args.concurrency:
                row = await decode(
                    generation, engine, PROMPTS[:c], decoding, max_tokens, calls if key == "tq_adapter" else None
                )
                row.update(case=key, label=label, max_tokens=max_tokens)
                out["rows"].append(row)
                print(
                    f"[{config}] {label}, c={c}: {row['tokens_per_s']:.2f} tokens/s"
                    + (f", reward {row['mean_reward']:.3f}" if row["mean_reward"] is not None else ""),
                    flush=True,
                )
    return out


def run_config(config: str, args, work: Path) -> dict:
    """One configuration in a child process (its own engines, gone when it exits)."""
    result = work / f"{config}.json"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        config,
        "--out",
        str(result),
        "--concurrency",
        *map(str, args.concurrency),
        "--plain-tokens",
        str(args.plain_tokens),
        "--tq-tokens",
        str(args.tq_tokens),
        *(["--cases", *args.cases] if args.cases else []),
    ]
    env = {**os.environ, **CONFIGS[config]}
    remote = None
    if config == "remote":
        remote = start_remote_baseline(work)
        env.update(ALIGND_BASELINE_URL=remote.base_url, ALIGND_BASELINE_SERVED_MODEL=REMOTE_NAME)
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            if proc.wait() != 0:
                raise SystemExit(f"configuration {config} failed (exit {proc.returncode})")
        finally:
            if proc.poll() is None:  # interrupted: stop the child's whole process group (its engines)
                os.killpg(proc.pid, 15)
                proc.wait()
    finally:
        if remote is not None:
            remote.stop()
    return json.loads(result.read_text())


def start_remote_baseline(work: Path):
    """``vllm serve`` of the merged adapter folder (the one the "merged" configuration serves in process),
    with alignd's engine settings; ready when this returns."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve_overhead import start_vllm_server

    from alignd.models.loading import merge_adapter, resolve_model_path
    from alignd.settings import EMBEDDED_ADAPTER_DIR, Settings

    settings = Settings()
    merged = merge_adapter(resolve_model_path(settings, progress=False), EMBEDDED_ADAPTER_DIR, settings.cache_dir)
    remote_settings = settings.model_copy(update={"served_model_name": REMOTE_NAME})
    server = start_vllm_server(str(merged), remote_settings, settings.cpu_kvcache_space_gib, work)
    print(f"remote baseline: vllm serve {merged} at {server.base_url}", flush=True)
    server.wait_ready()
    return server


def report(results: list[dict]) -> str:
    by = {(r["config"], row["case"], row["concurrency"]): row for r in results for row in r["rows"]}
    concurrencies = sorted({row["concurrency"] for r in results for row in r["rows"]})
    cases = [
        ("plain", "SFT decoding"),
        ("baseline", "the adapter sampled"),
        ("tq_adapter", "TQ* from the adapter"),
        ("tq_implicit", "TQ* implicit Q of the adapter"),
        ("tq_implicit_engine", "TQ* implicit Q in the engine's step"),
        ("tq_prompted", "TQ* from the prompted baseline"),
    ]
    head = (
        "| measured | "
        + " | ".join(f"{cfg}, c={c}" for cfg in [r["config"] for r in results] for c in concurrencies)
        + " |"
    )
    lines = [head, "|---" * (1 + len(results) * len(concurrencies)) + "|"]
    for key, label in cases:
        cells = []
        for r in results:
            for c in concurrencies:
                row = by.get((r["config"], key, c))
                if row is None:
                    cells.append("-")
                else:
                    reward = f" ({row['mean_reward']:.2f})" if row["mean_reward"] is not None else ""
                    cells.append(f"{row['tokens_per_s']:.2f}{reward}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for r in results:
        for c in concurrencies:
            row = by.get((r["config"], "tq_adapter", c))
            cells.append(f"{row['rollout_call_ms']:.0f} ms" if row and row.get("rollout_call_ms") else "-")
    lines.append("| one rollout request to the baseline's engine (TQ* from the adapter) | " + " | ".join(cells) + " |")
    starts = ", ".join(f"{r['config']}: {r['start_seconds']:.0f} s" for r in results)
    return "\n".join(lines) + f"\n\noutput tokens/s (mean positivity); engine start and warm-up: {starts}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--plain-tokens", type=int, default=64, help="new tokens of plain and baseline requests")
    parser.add_argument("--tq-tokens", type=int, default=32, help="new tokens of TQ* requests")
    parser.add_argument("--cases", nargs="+", choices=CASES, help="measure these only (default: all that apply)")
    parser.add_argument("--out", type=Path, default=None, help="write every number as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: checks the script, not the speed")
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.concurrency, args.plain_tokens, args.tq_tokens = [1, 2], 4, 2
    if max(args.concurrency) > len(PROMPTS):
        parser.error(f"--concurrency: at most {len(PROMPTS)} (the prompts defined)")
    if args.child:
        result = asyncio.run(measure(args.child, args))
        args.out.write_text(json.dumps(result, indent=2))
        return
    with tempfile.TemporaryDirectory() as work:
        results = []
        for config in args.configs:
            print(f"== configuration {config}: {CONFIGS[config]}", flush=True)
            results.append(run_config(config, args, Path(work)))
    print("\n" + report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
