"""The registry of decoding methods (``alignd.decoding.registry``): a method registered from a test, with
nothing changed in ``alignd/decoding`` or ``alignd/server``, is served over HTTP, admitted under its
family, metered, listed by ``GET /v1/methods`` and present in ``/openapi.json``; and the built-in
methods and value sources are listed with this server's defaults and limits."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import httpx
import pytest
from support import InProcessServer

from alignd.decoding.methods import DecodeChunk, Decoder
from alignd.decoding.prompt import Prompt
from alignd.decoding.registry import ALIGNED, MethodSpec, register_method, unregister_method
from alignd.settings import Settings

TOY = "runner_up"
MESSAGES = [{"role": "user", "content": "hello world how are"}]


class RunnerUpDecoder(Decoder):
    """A toy method: every token is the SFT model's second most likely one. While ``hold`` is clear,
    it waits before its first token (so that a test can keep its admission slot taken)."""

    hold: threading.Event | None = None  # set from the test's thread; the server runs in another

    async def run(self, prompt: Prompt) -> AsyncIterator[DecodeChunk]:
        if RunnerUpDecoder.hold is not None:
            await asyncio.to_thread(RunnerUpDecoder.hold.wait, 120)
        ids = list(prompt.token_ids)
        for i in range(self.max_tokens):
            second = (await self.sft.engine.top_k_next([ids], 2))[0][1].token_id
            ids.append(second)
            yield DecodeChunk([second], finish_reason="length" if i == self.max_tokens - 1 else None)


@pytest.fixture
def toy_method():
    spec = register_method(
        MethodSpec(
            TOY,
            "The SFT model's second choice at every step (a test's toy method).",
            ALIGNED,
            ("top_k",),
            lambda generation, config, params: RunnerUpDecoder(generation.sft, params),
        )
    )
    yield spec
    unregister_method(TOY)
    RunnerUpDecoder.hold = None


@pytest.fixture
def tiny_app_server(tiny_hf_engine, toy_method):
    """alignd over the tiny transformers engine, in this process (the toy method lives in its registry):
    one aligned request at a time, none queued."""
    from alignd.server.app import create_app

    settings = Settings(baseline_adapter="none", value_head="none", max_running_aligned=1, max_queued_aligned=0)
    with InProcessServer(create_app(settings, engine=tiny_hf_engine)) as server:
        yield server


def _runner_up_tokens(engine, prompt_ids: list[int], n: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(asyncio.run(engine.top_k_next([ids], 2))[0][1].token_id)
    return ids[len(prompt_ids) :]


def test_a_method_registered_by_a_test_is_served_listed_and_metered(tiny_app_server, tiny_hf_engine):
    url = tiny_app_server.base_url
    body = {"messages": MESSAGES, "max_tokens": 6, "decoding": {"method": TOY}}
    response = httpx.post(url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    expected = _runner_up_tokens(tiny_hf_engine, tiny_hf_engine.render_chat(MESSAGES), 6)
    assert choice["token_ids"] == expected
    assert choice["text"] == tiny_hf_engine.decode(expected)

    openapi = httpx.get(url + "/openapi.json").json()
    method_enum = openapi["components"]["schemas"]["DecodingConfig"]["properties"]["method"]["enum"]
    assert TOY in method_enum and "transfer_q" in method_enum

    listed = {m["name"]: m for m in httpx.get(url + "/v1/methods").json()["data"]}
    assert listed[TOY]["family"] == "aligned" and [p["name"] for p in listed[TOY]["parameters"]] == ["top_k"]
    assert listed[TOY]["parameters"][0]["limit"] == Settings().max_top_k

    metrics = httpx.get(url + "/metrics").text
    assert f'alignd_decoding_requests_total{{method="{TOY}"}} 1.0' in metrics


def test_a_registered_method_is_admitted_under_its_family(tiny_app_server):
    """With one aligned slot and no queue: a held toy request takes the aligned slot, so a second toy request
    is refused with 429 while a plain request is served; released, the first one is answered."""
    toy = {"messages": MESSAGES, "max_tokens": 2, "decoding": {"method": TOY}}
    RunnerUpDecoder.hold = hold = threading.Event()

    async def scenario() -> tuple[httpx.Response, ...]:
        async with httpx.AsyncClient(base_url=tiny_app_server.base_url, timeout=120) as client:
            first = asyncio.create_task(client.post("/generate", json=toy))
            try:
                for _ in range(400):  # until the first one holds the slot
                    if 'alignd_admission_running{family="aligned"} 1.0' in (await client.get("/metrics")).text:
                        break
                    await asyncio.sleep(0.05)
                second = await client.post("/generate", json=toy)
                plain = await client.post("/generate", json={"messages": MESSAGES, "max_tokens": 2})
            finally:
                hold.set()
            return await first, second, plain

    first, second, plain = asyncio.run(scenario())
    assert second.status_code == 429, second.text
    assert "aligned" in second.json()["error"]["message"] and second.headers["retry-after"]
    assert plain.status_code == 200, plain.text
    assert first.status_code == 200 and len(first.json()["choices"][0]["token_ids"]) == 2


def test_methods_lists_the_built_in_methods_and_value_sources_with_this_server_s_defaults(tiny_app_server):
    url = tiny_app_server.base_url
    listing = httpx.get(url + "/v1/methods").json()
    methods = {m["name"]: m for m in listing["data"]}
    assert {"sft", "baseline", "transfer_q", "args", "cd", "best_of_n"} <= set(methods)
    tq = methods["transfer_q"]
    assert tq["value_sources"] == ["rollouts", "head", "implicit"] and tq["needs_reward"] and tq["needs_baseline"]
    settings = Settings()
    top_k = {p["name"]: p for p in tq["parameters"]}["top_k"]
    assert (top_k["default"], top_k["limit"]) == (settings.decoding_top_k, settings.max_top_k)
    assert top_k["json_schema"]["minimum"] == 0 and "Candidate" in top_k["description"]  # 0: the vocabulary
    assert methods["sft"]["family"] == "plain" and methods["cd"]["family"] == "aligned"

    sources = {s["name"]: s for s in listing["value_sources"]}
    assert sources["rollouts"]["available"] and sources["rollouts"]["family"] == "aligned"
    head = sources["head"]
    assert head["in_engine"] and head["family"] == "plain" and not head["available"]
    assert "ALIGND_VALUE_HEAD" in head["unavailable_reason"]
    # no baseline of this server (the prompted one only) has an implicit Q
    assert not sources["implicit"]["available"] and "DPO or IRFT" in sources["implicit"]["unavailable_reason"]
    refused = httpx.post(
        url + "/generate",
        json={"messages": MESSAGES, "max_tokens": 2, "decoding": {"method": "transfer_q", "value": "head"}},
    )
    assert refused.status_code == 400 and refused.json()["error"]["message"] == head["unavailable_reason"]

    unknown = httpx.post(url + "/generate", json={"messages": MESSAGES, "decoding": {"method": "tq"}})
    assert unknown.status_code == 400
    assert "unknown decoding method 'tq'" in unknown.json()["error"]["message"]
    assert TOY in unknown.json()["error"]["message"]  # the registered ones, the test's toy included
