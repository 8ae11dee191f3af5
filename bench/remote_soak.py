"""Soak test of a remote baseline: real processes, mixed traffic, the remote restarted in the middle.

    .venv/bin/python bench/remote_soak.py --minutes 10 --out bench/results/remote_soak.json

Starts ``vllm serve`` of the embedded model (the remote baseline, on a fixed port) and ``alignd serve``
with ``ALIGND_BASELINE_URL`` pointing at it, then sends ``--concurrency`` clients' worth of mixed traffic
for ``--minutes``: plain chat, TQ* chat (its rollouts on the remote), reward scoring, streamed plain and
streamed TQ* answers. Halfway through, the remote is killed (SIGKILL) and started again on the same
port; alignd is never restarted. Traffic goes on for at least ``--after-minutes`` once the remote is
back (a vLLM start can take minutes on a busy CPU), so that recovery is exercised under load.

Reports requests served and errors by kind (status, error code, stream error events), the TQ* requests
refused while the remote was down, the alignd process tree's memory at start and end, and whether the
running-request gauges, admission slots and engine calls are back at idle at the end. Exit status 1 when
anything other than ``engine_unavailable`` failed, or the server did not come back to idle.
Benchmark on an idle machine (``flock /tmp/alignd-heavy.lock``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from processes import free_port  # noqa: E402
from servers import ServerProcess, run_unwinding_on_sigterm, start_alignd_server, start_vllm_server  # noqa: E402

REMOTE_NAME = "soak-baseline"
KINDS = ("plain", "tq", "reward", "stream_plain", "stream_tq")
TQ = {"method": "transfer_q", "top_k": 2, "rollout_len": 4, "num_rollouts": 1, "alpha": 1.0}
QUESTIONS = [
    "Tell me about Mondays.",
    "How was your weekend?",
    "Describe a rainy afternoon.",
    "What do you think of homework?",
    "Give me advice for a job interview.",
    "Describe your city.",
]
IDLE_GAUGES = (
    "alignd_running_requests",
    "alignd_admission_running",
    "alignd_admission_queued",
    "alignd_engine_requests_running",
    "alignd_engine_calls_running",
)


def log(message: str) -> None:
    print(f"[remote_soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


def tree_rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and every process of its group (alignd and its vLLM engine processes)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pid:
                continue
            status = (entry / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def gauges(base_url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + "/metrics", timeout=30).text
    out = collections.Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in IDLE_GAUGES:
                out[sample.name] += sample.value
    return dict(out)


class Traffic:
    """Clients sending the mix until ``deadline``; every outcome counted by kind."""

    def __init__(self, base_url: str, model: str, deadline: float) -> None:
        self.base_url, self.model, self.deadline = base_url, model, deadline
        self.outcomes: dict[str, collections.Counter] = {kind: collections.Counter() for kind in KINDS}
        self.latency: dict[str, list[float]] = {kind: [] for kind in KINDS}
        self.remote_down = False  # set while the remote is being restarted

    def body(self, i: int, decoding: dict | None, stream: bool) -> dict:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": 12,
            "temperature": 0,
            "stream": stream,
        }
        return body | ({"decoding": decoding} if decoding else {})

    async def one(self, client: httpx.AsyncClient, kind: str, i: int) -> str:
        if kind == "reward":
            items = [{"prompt": q, "response": "What a lovely day it is!"} for q in QUESTIONS[:4]]
            response = await client.post("/v1/rewards", json={"reward": "positivity", "items": items})
            return self.status(response)
        decoding = TQ if kind in ("tq", "stream_tq") else None
        if not kind.startswith("stream"):
            return self.status(await client.post("/v1/chat/completions", json=self.body(i, decoding, False)))
        async with client.stream("POST", "/v1/chat/completions", json=self.body(i, decoding, True)) as response:
            if response.status_code != 200:
                await response.aread()
                return self.status(response)
            outcome = "no [DONE]"
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    outcome = "ok" if outcome == "no [DONE]" else outcome
                    break
                event = json.loads(data)
                if "error" in event:
                    outcome = f"stream error {event['error'].get('code')}"
            return outcome

    @staticmethod
    def status(response: httpx.Response) -> str:
        if response.status_code == 200:
            return "ok"
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = "?"
        return f"{response.status_code} {code}"

    async def client_loop(self, worker: int) -> None:
        i = worker
        async with httpx.AsyncClient(base_url=self.base_url, timeout=600) as client:
            while time.monotonic() < self.deadline:  # read each time: the restart may extend it
                kind = KINDS[i % len(KINDS)]
                started = time.perf_counter()
                try:
                    outcome = await self.one(client, kind, i)
                except httpx.HTTPError as exc:
                    outcome = f"transport {type(exc).__name__}"
                self.outcomes[kind][outcome + (" (remote down)" if self.remote_down and outcome != "ok" else "")] += 1
                if outcome == "ok":
                    self.latency[kind].append(time.perf_counter() - started)
                i += 1

    def served(self) -> int:
        return sum(c["ok"] for c in self.outcomes.values())


def unexpected(outcomes: dict[str, collections.Counter]) -> dict[str, int]:
    """Outcomes other than success and the remote's own unavailability."""
    bad = collections.Counter()
    for kind, counter in outcomes.items():
        for outcome, count in counter.items():
            if outcome != "ok" and "engine_unavailable" not in outcome:
                bad[f"{kind}: {outcome}"] += count
    return dict(bad)


# The remote's engine computes on core 1, as a remote on its own machine would: with vLLM's default
# binding every engine of every process computes on core 0, and a remote restarted there beside
# alignd's busy engine failed its worker start-up (vLLM's 10-minute limit) in the third run.
REMOTE_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "1"}


class RemoteBaseline:
    """The remote baseline: ``vllm serve`` of the model on a fixed port, killed and started again there.
    Every process it starts is appended to ``servers`` (the caller stops them all at the end)."""

    def __init__(self, model_dir: str, settings, kv_cache_gib: int, log_dir: Path, servers: list) -> None:
        self.model_dir, self.settings, self.kv_cache_gib, self.log_dir = model_dir, settings, kv_cache_gib, log_dir
        self.servers = servers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: ServerProcess | None = None

    def start(self) -> ServerProcess:
        """Started (returns at once; call wait_ready)."""
        self.server = start_vllm_server(
            self.model_dir, self.settings, self.kv_cache_gib, self.log_dir, port=self.port, extra_env=REMOTE_ENV
        )
        self.servers.append(self.server)
        return self.server

    async def kill_and_restart(self) -> None:
        """SIGKILL to its process group, then started again on the same port and waited for."""
        os.killpg(self.server.pid, signal.SIGKILL)
        await asyncio.to_thread(self.server.proc.wait, 60)
        self.start()
        await asyncio.to_thread(self.server.wait_ready)


async def restart_halfway(
    traffic: Traffic, remote: RemoteBaseline, after_minutes: float, started: float, report: dict
) -> None:
    """Halfway to the traffic's deadline, the remote killed and started again while traffic goes on; then
    traffic for at least ``after_minutes`` more. ``report``: how long the remote was down, and the requests
    of each kind served after it was back."""
    deadline = traffic.deadline
    await asyncio.sleep((deadline - time.monotonic()) / 2)
    log(f"killing the remote (SIGKILL); {traffic.served()} requests served so far")
    traffic.remote_down = True
    # Traffic goes on while the remote restarts, however long that takes (6 minutes under load
    # here): the clients read the deadline before every request, and it is set again below.
    traffic.deadline = float("inf")
    down_at = time.monotonic()
    await remote.kill_and_restart()
    report["remote_down_s"] = round(time.monotonic() - down_at, 1)
    traffic.deadline = max(deadline, time.monotonic() + after_minutes * 60)
    served_before = {kind: counter["ok"] for kind, counter in traffic.outcomes.items()}
    # alignd checks a down remote again at most once a second: the first request after that is served
    await asyncio.sleep(1.5)
    traffic.remote_down = False
    log(f"remote back after {report['remote_down_s']} s; traffic until {(traffic.deadline - started) / 60:.1f} min")
    await asyncio.sleep(max(0.0, traffic.deadline - time.monotonic()))
    report["served_after_restart"] = {
        kind: counter["ok"] - served_before[kind] for kind, counter in traffic.outcomes.items()
    }


async def progress(traffic: Traffic, started: float) -> None:
    """A line every 30 s: requests served and not."""
    while time.monotonic() < traffic.deadline:
        await asyncio.sleep(30)
        log(
            f"{(time.monotonic() - started) / 60:.1f} min: {traffic.served()} served, "
            f"{sum(sum(c.values()) for c in traffic.outcomes.values()) - traffic.served()} not"
        )


async def drive(traffic: Traffic, concurrency: int, restart) -> None:
    clients = [asyncio.create_task(traffic.client_loop(w)) for w in range(concurrency)]
    await restart()
    await asyncio.gather(*clients)


async def soak(traffic: Traffic, concurrency: int, restart, started: float) -> None:
    """The traffic with the restart in it, and the progress lines while it runs."""
    ticker = asyncio.create_task(progress(traffic, started))
    try:
        await drive(traffic, concurrency, restart)
    finally:
        ticker.cancel()


def start_alignd(args: argparse.Namespace, log_dir: Path, remote: RemoteBaseline, servers: list) -> ServerProcess:
    """``alignd serve`` with the remote as its baseline, appended to ``servers`` and waited for."""
    alignd = start_alignd_server(
        args.kv_cache_gib,
        log_dir,
        extra_env={
            "ALIGND_BASELINE_URL": remote.url,
            "ALIGND_BASELINE_SERVED_MODEL": REMOTE_NAME,
            "ALIGND_VALUE_HEAD": "none",
            "ALIGND_DTYPE": "float32",
        },
    )
    servers.append(alignd)
    log("alignd starting")
    alignd.wait_ready()
    return alignd


def soak_summary(
    args: argparse.Namespace,
    traffic: Traffic,
    restart_report: dict,
    alignd: ServerProcess,
    memory_start: float,
    started: float,
) -> dict:
    """What the soak served and failed, and the state alignd was left in (read from the live server)."""
    idle = gauges(alignd.base_url)
    memory_end = tree_rss_mib(alignd.pid)
    health = httpx.get(alignd.base_url + "/health", timeout=30).json()
    summary = {
        "minutes": args.minutes,
        "traffic_minutes": round((time.monotonic() - started) / 60, 1),
        "concurrency": args.concurrency,
        "served": traffic.served(),
        "outcomes": {kind: dict(counter) for kind, counter in traffic.outcomes.items()},
        "median_latency_s": {
            kind: round(sorted(v)[len(v) // 2], 3) if v else None for kind, v in traffic.latency.items()
        },
        "unexpected": unexpected(traffic.outcomes),
        **restart_report,
        "memory_mib": {"start": round(memory_start), "end": round(memory_end)},
        "idle_gauges_at_end": idle,
        "health_at_end": health["status"],
    }
    recovered = restart_report.get("served_after_restart", {})
    summary["passed"] = (
        not summary["unexpected"]
        and all(v == 0 for v in idle.values())
        and health["status"] == "ok"
        and recovered.get("tq", 0) + recovered.get("stream_tq", 0) > 0
    )
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="traffic time (default 10)")
    parser.add_argument("--concurrency", type=int, default=4, help="clients sending at once (default 4)")
    parser.add_argument(
        "--after-minutes",
        type=float,
        default=2.0,
        help="traffic at least this long after the remote is back (default 2)",
    )
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    parser.add_argument("--out", type=Path, help="JSON summary here")
    parser.add_argument("--log-dir", type=Path, help="server logs here (default: a temporary folder)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from alignd.models.loading import resolve_model_path
    from alignd.settings import Settings

    settings = Settings(dtype="float32")
    model_dir = str(resolve_model_path(settings))
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="alignd-soak-"))
    servers: list[ServerProcess] = []
    try:
        remote_settings = settings.model_copy(update={"served_model_name": REMOTE_NAME})
        remote = RemoteBaseline(model_dir, remote_settings, args.kv_cache_gib, log_dir, servers)
        remote.start()
        log(f"remote baseline starting on {remote.url} (logs in {log_dir})")
        remote.server.wait_ready()
        alignd = start_alignd(args, log_dir, remote, servers)
        model = httpx.get(alignd.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
        memory_start = tree_rss_mib(alignd.pid)
        log(f"alignd ready, {memory_start:.0f} MiB; {args.minutes:g} min of traffic from {args.concurrency} clients")

        started = time.monotonic()
        traffic = Traffic(alignd.base_url, model, started + args.minutes * 60)
        restart_report: dict = {}

        def restart():
            return restart_halfway(traffic, remote, args.after_minutes, started, restart_report)

        asyncio.run(soak(traffic, args.concurrency, restart, started))
        time.sleep(2)  # the last streams' engine work ends
        summary = soak_summary(args, traffic, restart_report, alignd, memory_start, started)
    finally:
        for server in reversed(servers):
            server.stop()
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict:
    return run_unwinding_on_sigterm(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
