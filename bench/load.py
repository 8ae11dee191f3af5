"""The load of the serving benchmarks: one run of vLLM's own load generator (``vllm bench serve``) against
a server, with the server's CPU time per output token during the timed part; and the command-line
options that size those runs, which the serving benchmarks share.

    spec = LoadSpec(input_len=128, output_len=64, num_prompts=32, max_concurrency=8, ignore_eos=True)
    result = run_load("alignd", base_url, model_name, tokenizer_dir, spec, seed, work_dir, "round1-alignd")

    add_load_arguments(parser, rounds=3, seed=3000, concurrency=[1, 8])   # in a script's parse_args
    shrink_for_smoke(args)                                                 # --smoke: a tiny load

bench/ is a folder of scripts: ``bench/serve_overhead.py`` re-exports the load generator's names, which
the other scripts and the tests use as ``serve_overhead.<name>``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # bench/ is a folder of scripts: its siblings are imported by name
from servers import REPO, VLLM_CLI, ServerProcess, cpu_seconds  # noqa: E402


def _vllm_cli():
    """bench/vllm_cli.py as a module (this file may be imported from elsewhere, e.g. the tests)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("alignd_bench_vllm_cli", VLLM_CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class LoadSpec:
    input_len: int
    output_len: int
    num_prompts: int
    max_concurrency: int
    ignore_eos: bool
    extra: list[str] = field(default_factory=list)


def accepts_ignore_eos(base_url: str, model_name: str) -> bool:
    """Whether the server takes vLLM's ``ignore_eos`` extension in a chat request."""
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1,
        "temperature": 0,
        "ignore_eos": True,
    }
    try:
        return httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120).status_code == 200
    except httpx.HTTPError:
        return False


def random_prompts_file(tokenizer_dir: str, spec: LoadSpec, seed: int, path: Path) -> Path:
    """vLLM's random-dataset prompts (its own sampler, same seed and lengths) as a dataset file: the same
    requests as ``--dataset-name random`` without the ``ignore_eos`` it forces."""
    from transformers import AutoTokenizer

    _vllm_cli().install_version_shim()
    from vllm.benchmarks.datasets.datasets import RandomDataset

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    requests = RandomDataset(random_seed=seed).sample(
        tokenizer, spec.num_prompts, input_len=spec.input_len, output_len=spec.output_len, range_ratio=0.0
    )
    # ShareGPT's file shape (a user turn and a placeholder answer; the answer length comes from the flag)
    path.write_text(
        json.dumps(
            [{"conversations": [{"from": "human", "value": r.prompt}, {"from": "gpt", "value": ""}]} for r in requests]
        )
    )
    return path


def bench_serve_command(
    base_url: str, model_name: str, tokenizer: str, spec: LoadSpec, seed: int, result_dir: Path, result_name: str
) -> list[str]:
    cmd = [
        sys.executable,
        str(VLLM_CLI),
        "bench",
        "serve",
        "--backend",
        "openai-chat",
        "--base-url",
        base_url,
        "--endpoint",
        "/v1/chat/completions",
        "--model",
        model_name,
        "--tokenizer",
        tokenizer,
        "--num-prompts",
        str(spec.num_prompts),
        "--max-concurrency",
        str(spec.max_concurrency),
        "--request-rate",
        "inf",
        "--temperature",
        "0",
        "--seed",
        str(seed),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--save-result",
        "--result-dir",
        str(result_dir),
        "--result-filename",
        result_name,
        "--disable-tqdm",
    ]
    if spec.ignore_eos:  # the random dataset itself (it sends ignore_eos on its own)
        cmd += [
            "--dataset-name",
            "random",
            "--random-input-len",
            str(spec.input_len),
            "--random-output-len",
            str(spec.output_len),
            "--random-range-ratio",
            "0",
            "--ignore-eos",
        ]
    else:  # the same prompts from a file in ShareGPT's shape (this loader adds no chat template and no
        # ignore_eos; the custom JSONL loader would need pandas); the server applies the chat template
        prompts = random_prompts_file(tokenizer, spec, seed, result_dir / f"prompts-{seed}-{spec.num_prompts}.json")
        cmd += [
            "--dataset-name",
            "sharegpt",
            "--dataset-path",
            str(prompts),
            "--sharegpt-output-len",
            str(spec.output_len),
            "--disable-shuffle",
        ]
    return cmd + spec.extra


MAIN_RUN_STARTS = "Starting main benchmark run"  # what `vllm bench serve` prints around the timed part
MAIN_RUN_ENDS = "Serving Benchmark Result"


def run_load(
    side: str,
    base_url: str,
    model_name: str,
    tokenizer: str,
    spec: LoadSpec,
    seed: int,
    work_dir: Path,
    label: str,
    server: ServerProcess | None = None,
) -> dict:
    """One ``vllm bench serve`` run; returns its saved result JSON (plus the mean output length and, for a
    server this script started, the server's CPU milliseconds per output token during the timed part,
    front end and all processes: the client's output is read line by line to find that part)."""
    result_name = f"{label}.json"
    log_path = work_dir / f"{label}.log"
    cmd = bench_serve_command(base_url, model_name, tokenizer, spec, seed, work_dir, result_name)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_TARGET_DEVICE": os.environ.get("VLLM_TARGET_DEVICE", "cpu")}
    cpu: dict[str, dict[str, float]] = {}
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,
            env=env,
            text=True,
            errors="replace",
        )
        try:
            for line in proc.stdout:
                if server is not None and MAIN_RUN_STARTS in line and "before" not in cpu:
                    cpu["before"] = cpu_seconds(server.pid)
                elif server is not None and MAIN_RUN_ENDS in line and "after" not in cpu:
                    cpu["after"] = cpu_seconds(server.pid)
                out.write(line)
            rc = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
    if rc != 0:
        raise RuntimeError(f"vllm bench serve against {side} failed ({rc}):\n{tail}")
    result = json.loads((work_dir / result_name).read_text())
    if result.get("failed") or not result.get("completed"):
        raise RuntimeError(f"{side}: {result.get('failed')} of {spec.num_prompts} requests failed:\n{tail}")
    result["mean_output_tokens"] = result["total_output_tokens"] / result["completed"]
    if "before" in cpu and "after" in cpu:
        for part in ("front_end", "all"):
            used = cpu["after"][part] - cpu["before"][part]
            result[f"cpu_ms_per_token_{part}"] = 1000 * used / result["total_output_tokens"]
    return result


# ---------------------------------------------------------------------------- command-line options
def add_load_arguments(
    parser: argparse.ArgumentParser,
    *,
    rounds: int,
    seed: int,
    concurrency: list[int] | None = None,
    prompts_per_stream: int = 4,
    input_len: int = 128,
    output_len: int = 64,
) -> None:
    """The options that size a serving benchmark's runs, with the script's own defaults: --input-len,
    --output-len, --rounds, --seed, --kv-cache-gib, --work-dir, --out, --smoke. With a default
    ``concurrency`` (a script that runs at several concurrencies, ``prompts_per_stream`` requests per
    concurrent stream) also --concurrency, --prompts-per-stream and --no-warmup; without, the script sizes
    its runs itself (bench/serve_overhead.py: --num-prompts, --max-concurrency, --warmup-prompts)."""
    if concurrency is not None:
        parser.add_argument("--concurrency", type=int, nargs="+", default=list(concurrency))
        parser.add_argument(
            "--prompts-per-stream",
            type=int,
            default=prompts_per_stream,
            help="requests per run = this x the concurrency",
        )
        parser.add_argument("--no-warmup", action="store_true", help="skip the discarded warm-up runs (--smoke does)")
    parser.add_argument("--input-len", type=int, default=input_len, help="prompt tokens per request (random dataset)")
    parser.add_argument("--output-len", type=int, default=output_len, help="max_completion_tokens per request")
    parser.add_argument("--rounds", type=int, default=rounds, help="measured rounds (each: every side once)")
    parser.add_argument("--seed", type=int, default=seed, help="random-dataset seed of round 1 (round r: seed + r)")
    parser.add_argument(
        "--kv-cache-gib",
        type=int,
        default=None,
        help="VLLM_CPU_KVCACHE_SPACE of each server (default: alignd's setting)",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="server logs and raw results (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: checks the script, not the speed")


def shrink_for_smoke(args: argparse.Namespace) -> None:
    """Under --smoke, the tiny load of ``add_load_arguments``' options (it checks the script, not the
    speed): 16 prompt and 4 answer tokens, one round; at one concurrency of 2, one request a stream, no
    warm-up (each ``vllm bench serve`` is a process that imports vLLM: seconds apiece)."""
    if not args.smoke:
        return
    args.input_len, args.output_len, args.rounds = 16, 4, 1
    if "concurrency" in vars(args):
        args.prompts_per_stream, args.concurrency, args.no_warmup = 1, [2], True
