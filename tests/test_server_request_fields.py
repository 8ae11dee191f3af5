"""Every request field reaches generation, through the real server: the three bugs the "one door"
restructuring fixed, each shown over HTTP.

- ``ALIGND_MAX_PROMPTS_PER_REQUEST`` is the one limit on prompts per request (a schema bound of 64 used
  to shadow it);
- ``method: "sft"`` with diagnostics decodes with the request's full sampling fields (it used to drop
  ``top_p``, ``stop`` and the penalties);
- value-guided decoding honours presence and frequency penalties (it used to ignore them).
"""

from __future__ import annotations

import httpx
import pytest

from alignd.clients import Alignd

pytestmark = pytest.mark.server

MESSAGES = [{"role": "user", "content": "Write three sentences about your favourite food."}]


def test_prompts_per_request_follow_the_setting(server, model_name, session_server_env):
    limit = int(session_server_env["ALIGND_MAX_PROMPTS_PER_REQUEST"])
    assert limit > 64  # above the old schema bound, which used to win
    body = {"model": model_name, "max_tokens": 1, "temperature": 0}
    accepted = httpx.post(server.base_url + "/v1/completions", json={**body, "prompt": ["Hi"] * 80}, timeout=300)
    assert accepted.status_code == 200, accepted.text
    assert len(accepted.json()["choices"]) == 80
    refused = httpx.post(server.base_url + "/v1/completions", json={**body, "prompt": ["Hi"] * (limit + 1)})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert str(limit) in error["message"] and error["param"] == "prompt"


def test_sft_with_diagnostics_decodes_with_every_sampling_field(server):
    fields = dict(
        messages=MESSAGES,
        max_tokens=40,
        temperature=0.9,
        top_p=0.7,
        seed=11,
        presence_penalty=0.8,
        frequency_penalty=0.9,
    )
    with Alignd(server.base_url) as client:
        free = client.generate(**fields).choices[0]
        stop = free.text[20:24]
        assert stop.strip(), f"answer too short for a stop string: {free.text!r}"
        plain = client.generate(**fields, stop=stop).choices[0]
        diagnosed = client.generate(**fields, stop=stop, decoding={"method": "sft", "diagnostics": True}).choices[0]
    assert plain.finish_reason == "stop" and stop not in plain.text
    assert diagnosed.token_ids == plain.token_ids
    assert diagnosed.text == plain.text and diagnosed.finish_reason == plain.finish_reason
    assert diagnosed.alignment is not None and diagnosed.alignment.method == "sft"
    # and the fields did something: without them the same seed gives another answer
    with Alignd(server.base_url) as client:
        bare = client.generate(
            messages=MESSAGES, max_tokens=40, temperature=0.9, seed=11, decoding={"method": "sft", "diagnostics": True}
        ).choices[0]
    assert bare.token_ids != diagnosed.token_ids


def test_frequency_penalty_reduces_repetition_of_greedy_transfer_q(server):
    # from the prompted baseline (shares the SFT engine); the LoRA adapter decodes 2-4x slower (docs/BENCHMARKS.md)
    # (the penalty's mechanics, not the values': 3-token rollouts; 6-token ones took 72 s of the float32 suite, and
    # at 20 tokens the plain answer had no more repeats than the penalised one)
    tq = {
        "method": "transfer_q",
        "alpha": 0.1,
        "top_k": 4,
        "rollout_len": 3,
        "diagnostics": True,
        "baseline": "prompted",
    }

    def answer(**penalty):
        with Alignd(server.base_url, timeout=600) as client:
            return client.generate(messages=MESSAGES, max_tokens=32, temperature=0, decoding=tq, **penalty).choices[0]

    plain, penalised = answer(), answer(frequency_penalty=2.0)

    def repeats(tokens: list[int]) -> int:
        return len(tokens) - len(set(tokens))

    assert repeats(penalised.token_ids) < repeats(plain.token_ids), (plain.text, penalised.text)
    # the diagnostics show each candidate's penalty: 2.0 times its count in the answer before the step
    steps = penalised.alignment.steps
    assert any(c.penalty > 0 for s in steps for c in s.candidates)
    for step in steps:
        before = penalised.token_ids[: step.position]
        for c in step.candidates:
            assert c.penalty == pytest.approx(2.0 * before.count(c.token_id))
    assert all(c.penalty == 0 for s in plain.alignment.steps for c in s.candidates)
