"""Prometheus metrics of the server (prefix ``alignd_``), exposed at ``GET /metrics``.

Each app owns its registry, so several apps in one process (tests) never collide; vLLM's own
``vllm:`` metrics live in prometheus_client's default registry and are exposed beside ours.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import REGISTRY as DEFAULT_REGISTRY

from alignd.models.engine import CALL_OUTCOMES, ENGINE_CALLS

if TYPE_CHECKING:
    from alignd.server.admission import AdmissionController, FamilyGate

# The *_created series double every counter's cardinality and no dashboard uses them.
disable_created_metrics()

GENERATION_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/generate")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
# States of a probe job (alignd.probes.jobs), the labels of alignd_probe_jobs.
PROBE_JOB_STATES = ("queued", "running", "done", "failed", "cancelled")


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._add_http_metrics(self.registry)
        self._add_admission_metrics(self.registry)
        self._add_decoding_metrics(self.registry)
        self._add_engine_metrics(self.registry)
        self._add_probe_metrics(self.registry)
        # Event counters exist (at 0) from the start, so dashboards show 0 rather than "no data".
        for family in ("aligned", "plain"):
            for reason in ("queue_full", "queue_timeout"):
                self.admission_rejected.labels(family, reason)
        for endpoint in GENERATION_ENDPOINTS:
            self.client_disconnects.labels(endpoint)
            self.deadline_exceeded.labels(endpoint)

    def _add_http_metrics(self, r: CollectorRegistry) -> None:
        """Requests, latencies and tokens by endpoint."""
        self.requests = Counter(
            "alignd_requests",
            "HTTP requests by endpoint, method and status.",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "alignd_request_duration_seconds",
            "End-to-end request latency (until the last byte of a stream).",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "alignd_time_to_first_token_seconds",
            "Time from request arrival to the first generated token.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("alignd_prompt_tokens", "Prompt tokens processed.", ["endpoint"], registry=r)
        self.generation_tokens = Counter("alignd_generation_tokens", "Tokens generated.", ["endpoint"], registry=r)
        self.time_per_output_token = Histogram(
            "alignd_time_per_output_token_seconds",
            "Mean time per output token after the first, per response (inter-token latency).",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20),
            registry=r,
        )
        self.running_requests = Gauge(
            "alignd_running_requests", "Generation requests being served now.", ["endpoint"], registry=r
        )
        self.deadline_exceeded = Counter(
            "alignd_deadline_exceeded", "Requests stopped by their deadline.", ["endpoint"], registry=r
        )
        self.client_disconnects = Counter(
            "alignd_client_disconnects",
            "Requests whose client went away before the answer was complete (their engine work is cancelled).",
            ["endpoint"],
            registry=r,
        )

    def _add_admission_metrics(self, r: CollectorRegistry) -> None:
        """Admission control (the gauges read the controller when scraped; see bind_admission)."""
        self.admission_running = Gauge(
            "alignd_admission_running", "Requests holding a slot, by decoding family.", ["family"], registry=r
        )
        self.admission_queued = Gauge(
            "alignd_admission_queued", "Requests waiting for a slot, by decoding family.", ["family"], registry=r
        )
        self.admission_rejected = Counter(
            "alignd_admission_rejected",
            "Requests turned away: queue_full (429) or queue_timeout (503).",
            ["family", "reason"],
            registry=r,
        )

    def _add_decoding_metrics(self, r: CollectorRegistry) -> None:
        """Engine requests, aligned decoding's decisions and rollouts, rewards scored."""
        self.engine_requests = Gauge(
            "alignd_engine_requests_running",
            "Engine requests started and not finished (generation, top-k steps, rollouts, log-probabilities).",
            registry=r,
        )
        self.decoding_requests = Counter(
            "alignd_decoding_requests",
            "Aligned-decoding responses (choices) finished, by method.",
            ["method"],
            registry=r,
        )

        self.reward_items = Counter("alignd_reward_items", "Items scored, by reward.", ["reward"], registry=r)
        # aligned decoding
        self.decoding_steps = Counter(
            "alignd_decoding_steps", "Decisions taken by aligned decoding.", ["method"], registry=r
        )
        self.gated_steps = Counter(
            "alignd_decoding_gated_steps",
            "Decisions that skipped value estimation (confident SFT).",
            ["method"],
            registry=r,
        )
        self.rollouts = Counter("alignd_rollouts", "Rollouts run for value estimation.", ["method"], registry=r)
        self.rollout_tokens = Counter("alignd_rollout_tokens", "Tokens generated in rollouts.", ["method"], registry=r)
        self.value_step_seconds = Histogram(
            "alignd_value_step_seconds",
            "Seconds per decision (candidates, rollouts, rewards).",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.response_reward = Histogram(
            "alignd_response_reward",
            "Target reward of finished responses (with diagnostics).",
            ["method"],
            buckets=(-2, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2, 5),
            registry=r,
        )
        self.response_kl = Histogram(
            "alignd_response_kl",
            "KL from the SFT model summed over a response's decisions.",
            ["method"],
            buckets=(0, 0.1, 0.5, 1, 2, 5, 10, 20, 50, 100),
            registry=r,
        )

    def _add_engine_metrics(self, r: CollectorRegistry) -> None:
        """Engines by role (sft, baseline/<name>, reward/<name>); calls are reported by remote engines."""
        self.engine_up = Gauge(
            "alignd_engine_up",
            "1 while the engine can serve, 0 while it is down (a remote that cannot be reached).",
            ["engine", "kind"],
            registry=r,
        )
        self.engine_restarts = Gauge(
            "alignd_engine_restarts",
            "Times the engine was restarted after its engine process died, since alignd "
            "started (in-process vLLM engines; a remote engine recovers with its server).",
            ["engine"],
            registry=r,
        )
        self.engine_calls_running = Gauge(
            "alignd_engine_calls_running",
            "Calls started on the engine and not finished (streams, top-k steps, "
            "rollouts, log-probabilities): 0 when idle.",
            ["engine"],
            registry=r,
        )
        self.engine_calls = Counter(
            "alignd_engine_calls",
            "Calls to a remote engine, by primitive and outcome (ok, error, unavailable, cancelled).",
            ["engine", "call", "outcome"],
            registry=r,
        )
        self.engine_call_seconds = Histogram(
            "alignd_engine_call_seconds",
            "Duration of calls to a remote engine (a stream: until its last token).",
            ["engine", "call"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80),
            registry=r,
        )

    def _add_probe_metrics(self, r: CollectorRegistry) -> None:
        """Probe-analysis jobs (the gauge reads the job manager when scraped; see bind_probe_jobs)."""
        self.probe_jobs = Gauge(
            "alignd_probe_jobs",
            "Probe jobs held by the server now, by state (finished ones until evicted).",
            ["state"],
            registry=r,
        )
        self.probe_jobs_finished = Counter(
            "alignd_probe_jobs_finished", "Probe jobs finished, by final state.", ["state"], registry=r
        )
        self.probe_job_seconds = Histogram(
            "alignd_probe_job_seconds",
            "Run time of finished probe jobs.",
            buckets=LATENCY_BUCKETS + (640, 1280, 2560),
            registry=r,
        )

    def bind_engine(self, engine) -> None:
        self.engine_requests.set_function(engine.unfinished_requests)

    def bind_engines(self, engines: dict) -> None:
        """``engines``: by role (Generation.engines). The up gauge reads each engine's last known state
        when scraped; engines that report their calls (remote ones) count them here."""
        for name, engine in engines.items():

            def up(engine: Any = engine) -> float:
                return 1.0 if engine.health().status == "up" else 0.0

            self.engine_up.labels(name, engine.kind).set_function(up)
            self.engine_calls_running.labels(name).set_function(engine.unfinished_requests)
            # (reward classifiers on a remote are engines by role too, without a lifecycle of their own)
            self.engine_restarts.labels(name).set_function(getattr(engine, "restart_count", lambda: 0))

            def observe(call: str, seconds: float, outcome: str, name: str = name) -> None:
                self.engine_calls.labels(name, call, outcome).inc()
                self.engine_call_seconds.labels(name, call).observe(seconds)

            if engine.observe_calls(observe):
                for call in getattr(engine, "calls", ENGINE_CALLS):  # at 0 from the start: 0, not "no data"
                    for outcome in CALL_OUTCOMES:
                        self.engine_calls.labels(name, call, outcome)

    def bind_admission(self, admission: AdmissionController) -> None:
        for family, gate in admission.gates.items():

            def running(gate: FamilyGate = gate) -> int:
                return gate.running

            def queued(gate: FamilyGate = gate) -> int:
                return gate.queued

            self.admission_running.labels(family).set_function(running)
            self.admission_queued.labels(family).set_function(queued)

    def bind_probe_jobs(self, count: Callable[[str], int]) -> None:
        """``count(state)``: the probe jobs held in that state now (JobManager.count)."""
        for state in PROBE_JOB_STATES:

            def held(state: str = state) -> int:
                return count(state)

            self.probe_jobs.labels(state).set_function(held)

    def observe_probe_job(self, state: str, seconds: float | None) -> None:
        """A probe job finished in ``state``; ``seconds`` is its run time (None if it never started)."""
        self.probe_jobs_finished.labels(state).inc()
        if seconds is not None:
            self.probe_job_seconds.observe(seconds)

    def observe_step(self, method: str, step, seconds: float) -> None:
        self.decoding_steps.labels(method).inc()
        if step.gated:
            self.gated_steps.labels(method).inc()
        self.rollouts.labels(method).inc(step.cost.rollouts)
        self.rollout_tokens.labels(method).inc(step.cost.rollout_tokens)
        self.value_step_seconds.labels(method).observe(seconds)

    def observe_response(self, method: str, reward: float | None, kl: float | None) -> None:
        self.decoding_requests.labels(method).inc()
        if reward is not None:
            self.response_reward.labels(method).observe(reward)
        if kl is not None:  # the value head's distribution stays inside the engine: no KL to observe
            self.response_kl.labels(method).observe(kl)

    def render(self, include_default: bool = True) -> tuple[bytes, str]:
        body = generate_latest(self.registry)
        if include_default:
            body += generate_latest(DEFAULT_REGISTRY)
        return body, CONTENT_TYPE_LATEST


class RequestMetricsMiddleware:
    """Pure ASGI middleware: counts every request and times it until its last body byte, which for a
    streamed answer is the end of the stream (a BaseHTTPMiddleware would stop at the headers)."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, scope.get("method", ""), str(status["code"])).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)
