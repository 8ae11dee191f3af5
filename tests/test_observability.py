"""The Grafana dashboard against the real server: a real Prometheus scrapes the session server while
plain, streamed, aligned-decoding, reward and failing requests go through it, then every panel's
PromQL (deploy/grafana/dashboards/alignd.json, Grafana's variables substituted) must return data.

A query fails when it returns nothing (or only NaN) or uses a metric the server does not expose.
Event counters (429s, disconnects, deadlines) exist at 0 from the start, so their panels show 0.
"""

from __future__ import annotations

import re
import subprocess
import sys
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_server import (
    PrometheusServer,
    dashboard_queries,
    find_prometheus,
    is_finite,
)
from test_deploy import DASHBOARD, DOCKERFILES, dockerfile_healthcheck

pytestmark = pytest.mark.server

QUERIES = dashboard_queries(DASHBOARD)
METRIC_NAME = re.compile(r"\b(?:alignd_[a-z0-9_]+|vllm:[a-zA-Z0-9_:]+)")
# From the prompted baseline (it shares the SFT engine; the session's adapter is a LoRA, 2-4x slower a request
# on vLLM-CPU, and its implicit reward reads prompt log-probabilities through it): the panels are by method.
ALIGNED = {"method": "transfer_q", "top_k": 3, "rollout_len": 4, "diagnostics": True, "baseline": "prompted"}
EVERY_METHOD = [
    {"method": "sft", "diagnostics": True},
    {"method": "transfer_q", "transfer": "indirect", "top_k": 3, "rollout_len": 4, "baseline": "prompted"},
    {"method": "args", "top_k": 3},
    {"method": "cd", "top_k": 3, "rollout_len": 4},
    {"method": "best_of_n", "num_samples": 2},
]
QUERY_TIMEOUT_S = 20


def send_traffic(server, openai_client, model_name: str) -> None:
    messages = [{"role": "user", "content": "Say something kind."}]
    for _ in range(2):
        openai_client.chat.completions.create(model=model_name, messages=messages, max_tokens=4, temperature=0)
    for _chunk in openai_client.chat.completions.create(model=model_name, messages=messages, max_tokens=4, stream=True):
        pass
    openai_client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=4)
    for _ in range(2):
        openai_client.chat.completions.create(
            model=model_name, messages=messages, max_tokens=4, temperature=0, extra_body={"decoding": ALIGNED}
        )
    # every decoding method, so the by-method panels have a series each
    for decoding in EVERY_METHOD:
        openai_client.chat.completions.create(
            model=model_name, messages=messages, max_tokens=3, temperature=0, extra_body={"decoding": decoding}
        )
    with httpx.Client(base_url=server.base_url, timeout=300) as http:
        assert http.post("/generate", json={"prompt": "Hello", "max_tokens": 4}).status_code == 200
        scored = http.post(
            "/v1/rewards",
            json={
                "reward": "positivity",
                "items": [
                    {"prompt": "Hi", "response": "Lovely to meet you!"},
                    {"prompt": "Hi", "response": "Go away."},
                ],
            },
        )
        assert scored.status_code == 200, scored.text
        # a 4xx and a 5xx for the error panels: an unknown model, and aligned decoding that cannot
        # finish within the deadline the client asks for
        unknown = http.post("/v1/chat/completions", json={"model": "no-such-model", "messages": messages})
        assert unknown.status_code == 404
        late = http.post(
            "/generate",
            headers={"X-Request-Timeout": "0.05"},
            json={"prompt": "Hello", "max_tokens": 4, "decoding": ALIGNED},
        )
        assert late.status_code == 504, late.text


@pytest.fixture(scope="module")
def prometheus(server, openai_client_module, model_name):
    if find_prometheus() is None:
        pytest.fail("no prometheus binary: `make install-test` installs Debian's prometheus package")
    with PrometheusServer(urlsplit(server.base_url).netloc) as prom:
        # The first round creates the series, the second moves them between scrapes, so that rate()
        # and histogram_quantile() see increases inside their window.
        send_traffic(server, openai_client_module, model_name)
        prom.wait_scrapes(2)
        send_traffic(server, openai_client_module, model_name)
        prom.wait_scrapes(3)
        yield prom


@pytest.fixture(scope="module")
def openai_client_module(server):
    import openai

    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300) as client:
        yield client


def test_prometheus_scrapes_the_server(prometheus):
    names = prometheus.series_names()
    for name in (
        "alignd_requests_total",
        "alignd_request_duration_seconds_bucket",
        "alignd_generation_tokens_total",
        "alignd_rollouts_total",
        "alignd_response_reward_count",
        "vllm:generation_tokens_total",
    ):
        assert name in names
    assert prometheus.query('sum(alignd_requests_total{endpoint="/v1/chat/completions"})')


@pytest.mark.parametrize("title, expr", QUERIES, ids=[f"{i}-{title}" for i, (title, _) in enumerate(QUERIES)])
def test_dashboard_query_returns_data(prometheus, title, expr):
    missing = set(METRIC_NAME.findall(expr)) - prometheus.series_names()
    assert not missing, f"{title}: not exposed by the server: {sorted(missing)}"
    result = prometheus.wait_for(expr, timeout=QUERY_TIMEOUT_S, finite=True)
    assert result and any(is_finite(s) for s in result), f"{title}: {expr} returned {result}"


def test_docker_healthcheck_passes_against_the_server(server):
    """The images' HEALTHCHECK command, run here against the real server's /health."""
    port = str(urlsplit(server.base_url).port)
    for path in DOCKERFILES.values():
        command = dockerfile_healthcheck(path)
        result = subprocess.run(
            [sys.executable, *command[1:]], capture_output=True, text=True, timeout=30, env={"ALIGND_PORT": port}
        )
        assert result.returncode == 0, result.stderr
