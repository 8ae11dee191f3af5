"""Production behaviour through real servers.

* the session server (vLLM, the embedded model, admission limits 4 running / 8 queued for aligned
  decoding): overload answers 429 + Retry-After and never 5xx; a client that leaves (streaming or
  not) cancels its engine work within 2 s; deadlines stop the work with 504 / an error event;
* a small keyed server (the transformers engine on a tiny random Llama, API keys on, tight input
  limits): authentication, input limits, and a schemathesis fuzz run against its OpenAPI document.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from support import ServerProcess

pytestmark = pytest.mark.server

CHAT = "/v1/chat/completions"
SESSION_MODEL = "SmolLM2-135M-Instruct"  # the embedded model's served name


def metric_samples(base_url: str, headers: dict | None = None) -> list:
    text = httpx.get(base_url + "/metrics", headers=headers, timeout=30).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def metric(base_url: str, name: str, headers: dict | None = None, **labels) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for s in metric_samples(base_url, headers)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def idle(base_url: str) -> dict:
    """What must be zero once no request is being served."""
    samples = metric_samples(base_url)

    def total(name, **labels):
        return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    return {
        "engine requests": total("alignd_engine_requests_running"),
        "running requests": total("alignd_running_requests"),
        "aligned slots": total("alignd_admission_running", family="aligned"),
        "aligned queue": total("alignd_admission_queued", family="aligned"),
    }


def wait_idle(base_url: str, within_s: float) -> tuple[bool, dict, float]:
    start = time.monotonic()
    while True:
        state = idle(base_url)
        elapsed = time.monotonic() - start
        if not any(state.values()) or elapsed > within_s:
            return not any(state.values()), state, elapsed
        time.sleep(0.05)


def tq_chat(max_tokens: int, **extra) -> dict:
    return {
        "model": SESSION_MODEL,
        "messages": [{"role": "user", "content": "Tell me about your weekend."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        # from the prompted baseline (it shares the SFT engine): the committed adapter runs as a LoRA in the
        # session engine, whose requests vLLM-CPU decodes 2-4x slower (docs/BENCHMARKS.md); these tests are
        # about admission, disconnects and deadlines, not about which baseline rolls out
        "decoding": {"method": "transfer_q", "top_k": 3, "rollout_len": 4, "baseline": "prompted"},
        **extra,
    }


# ============================================================================ session server (vLLM)
async def test_fifty_concurrent_aligned_requests_get_only_200_or_429(server, session_admission_limits):
    before = metric(server.base_url, "alignd_admission_rejected_total", family="aligned", reason="queue_full")
    async with httpx.AsyncClient(
        base_url=server.base_url, timeout=600, limits=httpx.Limits(max_connections=64)
    ) as client:
        responses = await asyncio.gather(*(client.post(CHAT, json=tq_chat(4)) for _ in range(50)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    accepted, refused = statuses.count(200), statuses.count(429)
    # Everything that fits (the running slots and the queue) is served; the rest is told to come back.
    assert accepted >= session_admission_limits.running + session_admission_limits.queued
    assert refused >= 1
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            error = r.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "server_overloaded"
            assert "capacity" in error["message"]
        else:
            assert r.json()["choices"][0]["message"]["content"]
    # The typed client surfaces the refusal and when to retry.
    from alignd.clients import errors as client_errors

    refusal = next(r for r in responses if r.status_code == 429)
    error = client_errors.status_error(refusal, refusal.json())
    assert isinstance(error, client_errors.RateLimitError) and error.retry_after >= 1
    after = metric(server.base_url, "alignd_admission_rejected_total", family="aligned", reason="queue_full")
    assert after - before == refused
    # The server still answers, and every slot came back.
    assert httpx.get(server.base_url + "/health").status_code == 200
    ok, state, _ = wait_idle(server.base_url, 5)
    assert ok, state
    again = httpx.post(server.base_url + CHAT, json=tq_chat(2), timeout=120)
    assert again.status_code == 200


def test_streaming_client_that_disconnects_leaves_no_engine_work(server):
    before = metric(server.base_url, "alignd_client_disconnects_total", endpoint=CHAT)
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        with client.stream("POST", CHAT, json=tq_chat(64, stream=True)) as response:
            assert response.status_code == 200
            # (Not a for-break: leaving iter_lines early closes the connection there and then.)
            lines = response.iter_lines()
            while not next(lines).startswith("data: "):
                pass  # the answer has started: it will be left in the middle
            busy = idle(server.base_url)
            assert busy["running requests"] >= 1 and busy["aligned slots"] >= 1, busy
        left_at = time.monotonic()
    ok, state, elapsed = wait_idle(server.base_url, 2.0)
    assert ok, f"engine work still running {time.monotonic() - left_at:.2f} s after the client left: {state}"
    assert metric(server.base_url, "alignd_client_disconnects_total", endpoint=CHAT) == before + 1


def test_non_streaming_client_that_disconnects_leaves_no_engine_work(server):
    before = metric(server.base_url, "alignd_requests_total", endpoint=CHAT, status="499")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + CHAT, json=tq_chat(64), timeout=httpx.Timeout(120, read=2.0))
    ok, state, _ = wait_idle(server.base_url, 2.0)
    assert ok, state
    assert metric(server.base_url, "alignd_requests_total", endpoint=CHAT, status="499") == before + 1


def test_deadline_stops_a_whole_answer_with_504(server):
    start = time.monotonic()
    r = httpx.post(server.base_url + CHAT, json=tq_chat(64), headers={"X-Request-Timeout": "1"}, timeout=120)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - start < 10
    ok, state, _ = wait_idle(server.base_url, 2.0)
    assert ok, state


def test_deadline_ends_a_stream_with_an_error_event(server):
    events = []
    with httpx.stream(
        "POST", server.base_url + CHAT, json=tq_chat(64, stream=True), headers={"X-Request-Timeout": "1.5"}, timeout=120
    ) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "deadline_exceeded"
    ok, state, _ = wait_idle(server.base_url, 2.0)
    assert ok, state


async def test_concurrent_seeded_requests_with_long_prompts_do_not_kill_the_engine(server):
    """Regression: with chunked prefill, vllm-cpu 0.32's worker died on a seeded request whose prefill
    was split over steps (8 prompts of ~600 tokens overflow one step's token budget)."""
    words = " ".join(f"word{i}" for i in range(300))

    def body(i):
        return {"model": SESSION_MODEL, "prompt": f"{i} {words}", "max_tokens": 4, "temperature": 1, "seed": i}

    async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
        first = await asyncio.gather(*(client.post("/v1/completions", json=body(i)) for i in range(8)))
        assert [r.status_code for r in first] == [200] * 8, [r.text[:200] for r in first]
        again = await client.post("/v1/completions", json=body(3))
    assert again.status_code == 200
    assert again.json()["choices"][0]["text"] == first[3].json()["choices"][0]["text"]  # the seed still holds


def test_bad_deadline_header_is_a_400(server):
    r = httpx.post(server.base_url + CHAT, json=tq_chat(2), headers={"X-Request-Timeout": "soon"})
    assert r.status_code == 400
    assert "x-request-timeout" in r.json()["error"]["message"]


def test_without_keys_no_authentication_is_needed(server):
    assert httpx.get(server.base_url + "/v1/models").status_code == 200
    assert httpx.get(server.base_url + "/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200


# ============================================================================ keyed server (tiny)
KEYS = ("key-one", "key-two")
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}
LIMITS = {
    "ALIGND_MAX_MODEL_LEN": "128",
    "ALIGND_DEFAULT_MAX_TOKENS": "8",
    "ALIGND_MAX_OUTPUT_TOKENS": "16",
    "ALIGND_MAX_TOP_K": "4",
    "ALIGND_MAX_NUM_ROLLOUTS": "2",
    "ALIGND_MAX_ROLLOUT_LEN": "4",
    "ALIGND_MAX_N": "2",
    "ALIGND_MAX_BEST_OF_N": "4",
    "ALIGND_MAX_PROMPTS_PER_REQUEST": "4",
    "ALIGND_MAX_REWARD_BATCH": "8",
    "ALIGND_PROBE_MAX_TEXTS": "8",
    "ALIGND_MAX_REQUEST_BODY_BYTES": "65536",
    "ALIGND_REQUEST_TIMEOUT_S": "120",
}


@pytest.fixture(scope="module")
def keyed_server(tiny_llama_dir):
    env = {
        "ALIGND_ENGINE": "hf",
        "ALIGND_MODEL": str(tiny_llama_dir),
        "ALIGND_SERVED_MODEL_NAME": "tiny",
        "ALIGND_API_KEYS": ",".join(KEYS),
        "ALIGND_METRICS_REQUIRE_AUTH": "true",
        **LIMITS,
    }
    with ServerProcess(env) as proc:
        proc.wait_ready(timeout=180)
        yield proc


def test_missing_or_wrong_key_is_a_401_in_the_openai_shape(keyed_server):
    url = keyed_server.base_url
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    missing = httpx.post(url + CHAT, json=body)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    error = missing.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert "Authorization: Bearer" in error["message"]
    wrong = httpx.post(url + CHAT, json=body, headers={"Authorization": "Bearer key-three"})
    assert wrong.status_code == 401 and "invalid API key" in wrong.json()["error"]["message"]
    not_bearer = httpx.post(url + CHAT, json=body, headers={"Authorization": f"Basic {KEYS[0]}"})
    assert not_bearer.status_code == 401
    for path in ("/v1/models", "/v1/rewards", "/v1/probe/jobs"):
        assert httpx.get(url + path).status_code == 401, path


def test_right_key_works_with_the_openai_client(keyed_server):
    for key in KEYS:
        with openai.OpenAI(base_url=keyed_server.base_url + "/v1", api_key=key, max_retries=0) as client:
            out = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
            )
            assert out.choices[0].message.content is not None
    with openai.OpenAI(base_url=keyed_server.base_url + "/v1", api_key="nope", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_health_never_needs_a_key_and_metrics_do_when_configured(keyed_server):
    url = keyed_server.base_url
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 401
    metrics = httpx.get(url + "/metrics", headers=AUTH)
    assert metrics.status_code == 200 and "alignd_requests_total" in metrics.text


def test_metrics_are_open_by_default_when_keys_are_set(tiny_hf_engine):
    from alignd.server.app import create_app
    from alignd.settings import Settings

    app = create_app(Settings(api_keys="k", baseline_adapter="none", value_head="none"), engine=tiny_hf_engine)

    async def check():
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client,
        ):
            assert (await client.get("/metrics")).status_code == 200
            assert (await client.get("/health")).status_code == 200
            assert (await client.get("/v1/models")).status_code == 401

    asyncio.run(check())


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 17}, "limit of 16"),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "n": 3, "temperature": 1}, "limit of 2"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": "hi"}], "decoding": {"method": "transfer_q", "top_k": 5}},
            "decoding.top_k=5 is above this server's limit of 4",
        ),
        (
            CHAT,
            {"messages": [{"role": "user", "content": "hi"}], "decoding": {"method": "transfer_q", "rollout_len": 5}},
            "limit of 4",
        ),
        (
            CHAT,
            {"messages": [{"role": "user", "content": "hi"}], "decoding": {"method": "best_of_n", "num_samples": 5}},
            "limit of 4",
        ),
        (CHAT, {"messages": [{"role": "user", "content": "hi " * 200}]}, "context"),
        ("/v1/completions", {"prompt": ["a", "b", "c", "d", "e"], "max_tokens": 2}, "limit of 4"),
        ("/v1/rewards", {"reward": "positivity", "items": [{"prompt": "p", "response": "x"}] * 9}, "limit of 8"),
        ("/v1/probe/jobs", {"texts": [f"text {i}" for i in range(9)], "params": {"k_id": 2, "k_overlap": 2}}, "8"),
    ],
)
def test_cost_driving_fields_are_bounded_with_a_clear_4xx(keyed_server, path, body, says):
    if path in (CHAT, "/v1/completions"):
        body = {"model": "tiny", **body}
    r = httpx.post(keyed_server.base_url + path, json=body, headers=AUTH, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert says in r.json()["error"]["message"]


def test_oversized_bodies_are_a_413(keyed_server):
    url = keyed_server.base_url + CHAT
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 70000}]}
    r = httpx.post(url, json=big, headers=AUTH)
    assert r.status_code == 413 and "65536 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced while the body arrives
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"y" * 4096
        yield b'"}]}'

    r = httpx.post(url, content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413


# ---------------------------------------------------------------------------- fuzzing
FUZZ_EXAMPLES = 25  # per operation; derandomized, so a run is reproducible
FUZZ_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_fuzz_the_openapi_document(keyed_server):
    """schemathesis generates requests for every operation of the server's own OpenAPI document:
    no 5xx, and every answer (status, content type, body) matches the document.

    (Its pytest plugin's lazy loader does not run under pytest 9, so the cases are drawn with
    hypothesis directly from each operation's strategy.)"""
    schema = schemathesis.openapi.from_url(keyed_server.base_url + "/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    failures: dict[str, str] = {}
    statuses: dict[str, list[int]] = collections.defaultdict(list)
    messages: dict[str, list[str]] = collections.defaultdict(list)
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case):
            if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                case.body["model"] = "tiny"  # a random name is a 404 at once; the served one goes deeper
            if isinstance(case.body, dict):
                # limits that follow the settings are checked at run time, not in the schema: keep the
                # drawn values inside them so that some requests go deeper than the 400
                for field, limit in (("logprobs", 20), ("top_logprobs", 20)):
                    if isinstance(case.body.get(field), int) and not isinstance(case.body[field], bool):
                        case.body[field] = min(case.body[field], limit)
            response = case.call(headers=AUTH, timeout=120)
            if response.status_code == 400:
                messages[operation.label].append(response.json()["error"]["message"][:120])  # noqa: B023 - run() runs here
            statuses[operation.label].append(response.status_code)  # noqa: B023
            checks = FUZZ_CHECKS
            if response.status_code == 504 and (case.headers or {}).get("x-request-timeout") is not None:
                # The request set its own deadline (the fuzzer draws values down to 5e-324 s) and it
                # passed: a 504 deadline_exceeded is the documented answer, not a server fault.
                assert response.json()["error"]["code"] == "deadline_exceeded"
                checks = [c for c in FUZZ_CHECKS if c is not not_a_server_error]
            case.validate_response(response, checks=checks, headers=AUTH)

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - collected, reported together below
            failures[operation.label] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
    print({label: collections.Counter(codes) for label, codes in statuses.items()})
    assert all(statuses[op.label] for op in operations)
    assert sum(map(len, statuses.values())) >= 10 * len(operations)
    # The fuzzer got past validation into real generation, not only 4xx answers.
    generated = statuses["POST /v1/chat/completions"] + statuses["POST /v1/completions"] + statuses["POST /generate"]
    assert 200 in generated, {
        k: collections.Counter(v).most_common(5) for k, v in messages.items() if "generat" in k or "completions" in k
    }
    # The server survived it.
    assert httpx.get(keyed_server.base_url + "/health").status_code == 200
