"""The servers the serving benchmarks start and stop: ``vllm serve`` with the engine settings alignd gives
vLLM, and ``alignd serve``, each in its own process group (its engine processes die with it); the CPU time
of such a group; and a run that stops its servers on SIGTERM too.

    server = start_vllm_server(model_dir, settings, kv_cache_gib, log_dir)   # returns at once
    server.wait_ready()                                                       # seconds until /health is 200
    ...
    server.stop()

bench/ is a folder of scripts: ``bench/serve_overhead.py`` re-exports these names, which the other scripts
and the tests use as ``serve_overhead.<name>``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VLLM_CLI = BENCH / "vllm_cli.py"
START_TIMEOUT_S = 600

# bench/ is a folder of scripts, not a package: its sibling modules are imported from it by name (the
# tests put bench/ on the path the same way, so there is one copy of each).
sys.path.insert(0, str(BENCH))
from processes import ManagedProcess, free_port  # noqa: E402

# A server started by this script in its own process group (its engine processes die with it): name,
# base_url, log_path, wait_ready() -> seconds, stop(), pid (the group, for cpu_seconds).
ServerProcess = ManagedProcess


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
