"""Engines end with the process that started them: ``alignd serve`` after SIGTERM to its own pid (what
``docker stop`` sends to PID 1) and after SIGKILL, and an interrupted ``alignd train value-head`` run,
each on the tiny vLLM model. The children (vLLM's EngineCore) are found through /proc before the signal
and must all be gone within ``GONE_WITHIN_S``: after SIGKILL of the parent only alignd's own watch in
the engine (alignd.vllm_plugin.parent_watch) can notice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest
from support import ON_THE_SESSION_CORE, ManagedProcess, ServerProcess, tiny_server_env

pytestmark = pytest.mark.vllm

GONE_WITHIN_S = 30


def engine_children(pid: int) -> list[psutil.Process]:
    """The vLLM engine processes among ``pid``'s descendants."""
    return [p for p in psutil.Process(pid).children(recursive=True) if "EngineCore" in " ".join(p.cmdline()) + p.name()]


def wait_for_engines(pid: int, timeout: float = 600) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if children := engine_children(pid):
            return children
        time.sleep(1)
    raise AssertionError(f"no vLLM engine process under pid {pid} after {timeout} s")


def assert_all_gone(leader: ManagedProcess, children: list[psutil.Process], what: str) -> float:
    """Waits until the process we started and its descendants have all exited (zombies count as gone);
    returns the seconds it took. The leader is waited for through its Popen, so that its exit status stays
    readable (psutil would reap it, and Popen would then report 0)."""
    start = time.monotonic()
    try:
        leader.proc.wait(GONE_WITHIN_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what}: pid {leader.pid} still running after {GONE_WITHIN_S} s") from None
    left = max(0.0, GONE_WITHIN_S - (time.monotonic() - start))
    _, alive = psutil.wait_procs(children, timeout=left)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"{what}: {[(p.pid, p.name()) for p in alive]} still running after {GONE_WITHIN_S} s"
    return time.monotonic() - start


def assert_server_and_engines_end_after(server: ServerProcess, sig: signal.Signals) -> None:
    children = psutil.Process(server.pid).children(recursive=True)
    assert engine_children(server.pid), "the server runs its engine in a child process"
    os.kill(server.pid, sig)  # the server's pid alone, as `docker stop` signals PID 1
    took = assert_all_gone(server, children, f"alignd serve after {sig.name}")
    print(f"{sig.name}: server and {len(children)} children gone in {took:.1f} s")
    if sig == signal.SIGTERM:
        # an orderly shutdown, not a crash: uvicorn re-raises the signal it handled once it is done (-15)
        assert server.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in server.log_tail(80)


@pytest.fixture(scope="module")
def servers(tiny_vllm_dir) -> Iterator[dict[str, ServerProcess]]:
    """The two servers this module signals, started together (each start is mostly single-threaded process
    start-up and imports: two at once take about the time of one on 2 cores). ``restarted`` is float32, so
    that its greedy answer after the engine's restart is the same as before."""
    with (
        ServerProcess({**tiny_server_env(tiny_vllm_dir), **ON_THE_SESSION_CORE}) as killed,
        ServerProcess({**tiny_server_env(tiny_vllm_dir), "ALIGND_DTYPE": "float32"}) as restarted,
    ):
        for server in (killed, restarted):
            server.wait_ready(timeout=600)
        yield {"killed": killed, "restarted": restarted}


def test_alignd_serve_killed_takes_its_engines_with_it(servers):
    """After SIGKILL only the engine's own watch (alignd.vllm_plugin.parent_watch) can notice."""
    assert_server_and_engines_end_after(servers["killed"], signal.SIGKILL)


def test_an_interrupted_value_head_run_takes_its_engines_with_it(tiny_vllm_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": p}) + "\n"
            for i, p in enumerate(["the cat sat", "hello world", "a happy answer", "numbers one"])
        )
    )
    out = tmp_path / "head"
    cmd = [
        sys.executable,
        "-m",
        "alignd.cli",
        "train",
        "value-head",
        "--model",
        str(tiny_vllm_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--states",
        "2000",
        "--top-k",
        "3",
        "--rollout-len",
        "4",
        "--answer-len",
        "6",
        "--reward",
        "length_penalty",
        "--baseline",
        "prompted",
    ]
    env = {
        **os.environ,
        **tiny_server_env(tiny_vllm_dir),
        "ALIGND_CACHE_DIR": str(tmp_path / "cache"),
        "TQDM_DISABLE": "1",
    }
    with ManagedProcess(cmd, name="alignd train value-head", log_path=tmp_path / "train.log", env=env) as run:
        engines = wait_for_engines(run.pid)
        time.sleep(2)
        children = psutil.Process(run.pid).children(recursive=True)
        os.kill(run.pid, signal.SIGTERM)
        took = assert_all_gone(run, children, "alignd train value-head after SIGTERM")
        assert run.returncode == 130, run.log_tail()  # interrupted, and says so
        assert "interrupted" in run.log_path.read_text()
        print(f"value-head run and {len(children)} children ({len(engines)} engines) gone in {took:.1f} s")


def test_a_killed_engine_is_restarted_and_the_server_ends_with_its_engines_on_sigterm(servers):
    """SIGKILL to the server's EngineCore: requests in flight and new ones get 503 engine_unavailable with
    Retry-After (not 500), /health names the engine, and within a minute the same request is answered again
    (the same greedy answer, float32), by the same server process, with the restart counted. Then SIGTERM to
    the server's pid: it and all its children (the restarted engine's too) are gone within 30 s."""
    import asyncio

    import httpx

    body = {"model": "tiny", "prompt": "the cat sat on", "max_tokens": 8, "temperature": 0}
    long_body = {**body, "max_tokens": 200}
    server = servers["restarted"]
    url = server.base_url + "/v1/completions"
    before = httpx.post(url, json=body, timeout=60).json()["choices"][0]["text"]
    [engine] = engine_children(server.pid)

    async def in_flight() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            tasks = [asyncio.create_task(client.post(url, json=long_body)) for _ in range(4)]
            await asyncio.sleep(0.3)
            engine.kill()
            return list(await asyncio.gather(*tasks))

    for reply in asyncio.run(in_flight()):
        assert reply.status_code in (200, 503), reply.text
        if reply.status_code == 503:
            assert reply.json()["error"]["code"] == "engine_unavailable", reply.text
    refused = httpx.post(url, json=body, timeout=60)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable", refused.text
    assert int(refused.headers["Retry-After"]) > 0
    health = httpx.get(server.base_url + "/health", timeout=30)
    assert health.status_code == 503 and health.json()["engines"]["sft"]["status"] == "down", health.text

    deadline = time.monotonic() + 60
    while (reply := httpx.post(url, json=body, timeout=60)).status_code != 200:
        assert reply.status_code == 503 and time.monotonic() < deadline, reply.text
        time.sleep(1)
    assert reply.json()["choices"][0]["text"] == before
    assert server.running and httpx.get(server.base_url + "/health", timeout=30).status_code == 200
    assert engine_children(server.pid) and engine not in engine_children(server.pid)
    metrics = httpx.get(server.base_url + "/metrics", timeout=30).text
    assert 'alignd_engine_restarts{engine="sft"} 1.0' in metrics
    assert_server_and_engines_end_after(server, signal.SIGTERM)
