"""Prometheus metrics of the server (prefix ``alignd_``), exposed at ``GET /metrics``.

Each app owns its registry, so several apps in one process (tests) never collide; vLLM's own
``vllm:`` metrics live in prometheus_client's default registry and are exposed beside ours.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import disable_created_metrics

# The *_created series double every counter's cardinality and no dashboard uses them.
disable_created_metrics()

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "alignd_requests", "HTTP requests by endpoint, method and status.", ["endpoint", "method", "status"], registry=r
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
        self.running_requests = Gauge(
            "alignd_running_requests", "Generation requests being served now.", ["endpoint"], registry=r
        )

        self.reward_items = Counter("alignd_reward_items", "Items scored, by reward.", ["reward"], registry=r)
        # aligned decoding
        self.decoding_steps = Counter("alignd_decoding_steps", "Decisions taken by aligned decoding.", ["method"], registry=r)
        self.gated_steps = Counter(
            "alignd_decoding_gated_steps", "Decisions that skipped value estimation (confident SFT).", ["method"], registry=r
        )
        self.rollouts = Counter("alignd_rollouts", "Rollouts run for value estimation.", ["method"], registry=r)
        self.rollout_tokens = Counter("alignd_rollout_tokens", "Tokens generated in rollouts.", ["method"], registry=r)
        self.value_step_seconds = Histogram(
            "alignd_value_step_seconds", "Seconds per decision (candidates, rollouts, rewards).", ["method"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.response_reward = Histogram(
            "alignd_response_reward", "Target reward of finished responses (with diagnostics).", ["method"],
            buckets=(-2, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2, 5), registry=r,
        )
        self.response_kl = Histogram(
            "alignd_response_kl", "KL from the SFT model summed over a response's decisions.", ["method"],
            buckets=(0, 0.1, 0.5, 1, 2, 5, 10, 20, 50, 100), registry=r,
        )

    def observe_step(self, method: str, step, seconds: float) -> None:
        self.decoding_steps.labels(method).inc()
        if step.gated:
            self.gated_steps.labels(method).inc()
        self.rollouts.labels(method).inc(step.cost.rollouts)
        self.rollout_tokens.labels(method).inc(step.cost.rollout_tokens)
        self.value_step_seconds.labels(method).observe(seconds)

    def observe_alignment(self, alignment: dict) -> None:
        self.response_reward.labels(alignment["method"]).observe(alignment["reward"])
        self.response_kl.labels(alignment["method"]).observe(alignment["kl"])

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
