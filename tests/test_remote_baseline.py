"""The baseline on a remote ``vllm serve`` (ALIGND_BASELINE_URL), through a real alignd server: its own
processes on loopback, so the rest of the suite keeps its session server.

The remote serves the embedded SFT model itself (float32, like alignd's engine). TQ* direct transfer from
a baseline that *is* the SFT model computes, at every decision, the same values as token-wise CD (whose
rollouts are the SFT model's own, in process): greedy rollouts of the same prefixes, scored by the same
reward. So greedy TQ* through the remote must give CD's answers, token for token.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from support import ServerProcess, vllm_serve_process

pytestmark = pytest.mark.server

REMOTE_NAME = "smollm2-remote"
QUESTIONS = ["Tell me about Mondays.", "How was your weekend?", "Describe a rainy afternoon.",
             "What do you think of homework?"]
RULE = {"alpha": 1.0, "top_k": 4, "rollout_len": 4, "num_rollouts": 1}


@pytest.fixture(scope="module")
def remote(embedded_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("remote-baseline") / "vllm-serve.log"
    with vllm_serve_process(embedded_model_dir, REMOTE_NAME, log, max_model_len=2048) as server:
        server.wait_ready(timeout=1200)
        yield server


@pytest.fixture(scope="module")
def aligned(remote):
    env = {"ALIGND_BASELINE_URL": remote.base_url, "ALIGND_VALUE_HEAD": "none", "ALIGND_DTYPE": "float32",
           "ALIGND_CPU_KVCACHE_SPACE_GIB": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with ServerProcess(env) as proc:
        proc.wait_ready(timeout=1200)
        yield proc


def chat(model: str, question: str, decoding: dict | None, max_tokens: int = 8) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0}
    return body | ({"decoding": decoding} if decoding else {})


def answer(server, body: dict) -> dict:
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_the_default_baseline_is_the_remote(aligned, remote, model_name):
    cards = {c["name"]: c for c in httpx.get(aligned.base_url + "/v1/baselines", timeout=30).json()["data"]}
    assert cards["default"]["kind"] == "remote"
    assert remote.base_url in cards["default"]["source"] and REMOTE_NAME in cards["default"]["source"]
    assert cards["prompted"]["kind"] == "prompted"


def test_tq_through_a_remote_copy_of_the_sft_model_is_cd(aligned, model_name):
    for question in QUESTIONS:
        tq = answer(aligned, chat(model_name, question, {"method": "transfer_q", "diagnostics": True, **RULE}))
        cd = answer(aligned, chat(model_name, question, {"method": "cd", "cd_mode": "token", **RULE}))
        assert tq["message"]["content"] == cd["message"]["content"], question
        assert tq["alignment"]["baseline"] == "default" and tq["alignment"]["baseline_kind"] == "remote"
        assert tq["alignment"]["cost"]["rollouts"] > 0


def test_a_remote_that_dies_fails_only_the_requests_that_need_it(aligned, remote, model_name):
    """Last in the module: it kills the remote."""
    os.killpg(remote.pid, signal.SIGKILL)
    started = time.perf_counter()
    response = httpx.post(aligned.base_url + "/v1/chat/completions", timeout=120,
                          json=chat(model_name, QUESTIONS[0], {"method": "transfer_q", **RULE}))
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "engine_unavailable" and "engine 'default'" in response.text
    assert response.headers["Retry-After"]
    assert time.perf_counter() - started < 30  # at once, not after a timeout
    plain = httpx.post(aligned.base_url + "/v1/chat/completions", timeout=120, json=chat(model_name, QUESTIONS[0], None))
    assert plain.status_code == 200
