"""The real server (subprocess, vLLM, embedded SmolLM2) over real HTTP: the official ``openai``
client, alignd's own client, raw requests for malformed input, and the metrics endpoint."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from precision import assert_same_greedy_answer

from alignd.clients import Alignd, AsyncAlignd, BadRequestError, NotFoundError
from alignd.models.engine import GenerationParams

pytestmark = pytest.mark.server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def assert_still_serving(server) -> None:
    with Alignd(server.base_url) as client:
        answer = client.generate(prompt="Hello", max_tokens=2, temperature=0)
    assert len(answer.choices[0].token_ids) >= 1


# ---------------------------------------------------------------------------- OpenAI client
def test_models_lists_the_served_model(openai_client, model_name):
    ids = [m.id for m in openai_client.models.list().data]
    assert ids == [model_name]


def test_chat_completion(openai_client, model_name):
    r = openai_client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=16, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(openai_client, model_name):
    kwargs = dict(model=model_name, messages=QUESTION, max_tokens=24, temperature=0)
    whole = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(openai_client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_chat_n_seed_and_logprobs(openai_client, model_name):
    kwargs = dict(model=model_name, messages=QUESTION, max_tokens=8, temperature=1.0, seed=11, n=3)
    a = openai_client.chat.completions.create(**kwargs)
    b = openai_client.chat.completions.create(**kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    r = openai_client.chat.completions.create(
        model=model_name, messages=QUESTION, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob <= 0 and item.logprob >= item.top_logprobs[0].logprob - 0.06
    assert "".join(item.token for item in content) == r.choices[0].message.content


def test_chat_stop_sequence(openai_client, model_name):
    base = openai_client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=16, temperature=0)
    text = base.choices[0].message.content
    stop = text.split()[2]  # a word from the middle of the greedy answer
    r = openai_client.chat.completions.create(
        model=model_name, messages=QUESTION, max_tokens=16, temperature=0, stop=[stop]
    )
    assert r.choices[0].message.content == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_completions_batch_stream_and_logprobs(openai_client, model_name):
    r = openai_client.completions.create(
        model=model_name, prompt=["Once upon a time", "The sky is"], max_tokens=6, temperature=0, logprobs=2
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) > 0
        assert "".join(c.logprobs.tokens) == c.text
    stream = openai_client.completions.create(
        model=model_name, prompt="The sky is", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].text for ch in stream) == r.choices[1].text
    echo = openai_client.completions.create(
        model=model_name, prompt="The sky is", max_tokens=6, temperature=0, echo=True
    )
    assert echo.choices[0].text == "The sky is" + r.choices[1].text


def test_greedy_through_the_server_equals_the_engine_called_directly(
    openai_client, model_name, vllm_engine, loop_thread
):
    """Same settings, same prompt: the HTTP path adds nothing to what the engine produces."""
    prompts = [QUESTION, [{"role": "user", "content": "Give me three words about the sea."}]]
    for messages in prompts:
        served = openai_client.chat.completions.create(
            model=model_name, messages=messages, max_tokens=32, temperature=0
        )
        direct = loop_thread.run(
            vllm_engine.generate(
                vllm_engine.render_chat(messages), GenerationParams(max_tokens=32, temperature=0.0), "direct"
            )
        )
        assert served.choices[0].message.content == direct.choices[0].text
        assert served.usage.completion_tokens == len(direct.choices[0].token_ids)


# ---------------------------------------------------------------------------- alignd client
def test_native_generate_with_the_sync_client(server, model_name):
    with Alignd(server.base_url) as client:
        health = client.health()
        assert health.status == "ok" and health.engines["sft"].status == "up" and health.engines["sft"].kind == "vllm"
        assert client.models() == [model_name]
        r = client.generate(messages=QUESTION, max_tokens=12, temperature=0, logprobs=2)
        c = r.choices[0]
        assert c.text.strip()
        assert len(c.token_ids) == r.usage.completion_tokens == len(c.logprobs)
        assert c.finish_reason in ("stop", "length")
        events = list(client.generate_stream(messages=QUESTION, max_tokens=12, temperature=0))
        assert "".join(e.text for e in events if e.index is not None) == c.text
        assert [t for e in events if e.index is not None for t in e.token_ids] == c.token_ids
        assert events[-1].usage.completion_tokens == len(c.token_ids)


def test_native_generate_with_the_async_client(server, served_precision, embedded_model_dir):
    async def scenario():
        async with AsyncAlignd(server.base_url) as client:
            # concurrent requests are batched by the engine and each gets its own answer
            answers = await asyncio.gather(
                *(client.generate(prompt=f"Count to {i}:", max_tokens=6, temperature=0, logprobs=2) for i in (3, 5, 7))
            )
            events = [e async for e in client.generate_stream(prompt="Count to 3:", max_tokens=6, temperature=0)]
            return answers, events

    answers, events = asyncio.run(scenario())
    assert all(len(a.choices[0].token_ids) > 0 for a in answers)
    streamed = [e for e in events if e.index is not None]
    streamed_ids = [t for e in streamed for t in e.token_ids]
    first = answers[0].choices[0]
    # The stream alone and the same prompt batched with two others: the same greedy answer where the
    # engine computes in float32; in bfloat16 the batch changes the rounding, so they may part at a near-tie
    # (tests/precision.py), and the streamed text is then compared with its own tokens.
    assert_same_greedy_answer(
        first.token_ids,
        [{t.token_id: t.logprob for t in step.top} for step in first.logprobs],
        streamed_ids,
        served_precision.near_tie_between_runs(0.0),
    )
    text = "".join(e.text for e in streamed)
    if streamed_ids == first.token_ids:
        assert text == first.text
    else:
        from transformers import AutoTokenizer

        assert text == AutoTokenizer.from_pretrained(embedded_model_dir).decode(streamed_ids)


def test_client_raises_typed_errors(server):
    with Alignd(server.base_url) as client:
        with pytest.raises(BadRequestError) as bad:
            client.generate(prompt="hi", temperature=-1)
        assert bad.value.param == "temperature" and bad.value.status_code == 400
        with pytest.raises(NotFoundError):
            client.generate(prompt="hi", model="no-such-model")
        with pytest.raises(BadRequestError, match="exactly one"):
            client.generate(prompt="hi", messages=QUESTION)


# ---------------------------------------------------------------------------- bad input
BAD_CHAT_BODIES = {
    "unknown field": ({"messages": QUESTION, "max_tokenz": 5}, "max_tokenz"),
    "empty messages": ({"messages": []}, "messages"),
    "empty message text": ({"messages": [{"role": "user", "content": "  "}]}, "messages"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    "max_tokens beyond context": ({"messages": QUESTION, "max_tokens": 10**6}, "max_tokens"),
    "negative temperature": ({"messages": QUESTION, "temperature": -0.5}, "temperature"),
    "absurd temperature": ({"messages": QUESTION, "temperature": 1e9}, "temperature"),
    "zero top_p": ({"messages": QUESTION, "top_p": 0}, "top_p"),
    "n above limit": ({"messages": QUESTION, "n": 1000, "temperature": 1}, "n"),
    "n with greedy": ({"messages": QUESTION, "n": 2, "temperature": 0}, None),
    "zero max_tokens": ({"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
    "top_logprobs too large": ({"messages": QUESTION, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    "wrong type": ({"messages": "hello"}, "messages"),
}


@pytest.mark.parametrize("case", list(BAD_CHAT_BODIES), ids=list(BAD_CHAT_BODIES))
def test_bad_chat_requests_get_400_that_names_the_field(server, model_name, case):
    body, param = BAD_CHAT_BODIES[case]
    for stream in (False, True):
        r = httpx.post(
            server.base_url + "/v1/chat/completions", json={"model": model_name, **body, "stream": stream}, timeout=60
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["message"]
        if param is not None:
            assert error["param"] is not None and error["param"].startswith(param)
            assert param in error["message"]
    assert_still_serving(server)


def test_unknown_model_is_404_through_openai(openai_client):
    with pytest.raises(openai.NotFoundError) as err:
        openai_client.chat.completions.create(model="gpt-17", messages=QUESTION, max_tokens=2)
    assert "gpt-17" in err.value.body["message"] and err.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    "raw, fix",
    [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"", "JSON")],
    ids=["malformed", "array", "empty"],
)
def test_malformed_bodies_get_400(server, raw, fix):
    r = httpx.post(server.base_url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert fix in r.json()["error"]["message"]
    assert_still_serving(server)


def test_prompt_over_the_context_is_rejected_with_the_numbers(server, model_name):
    long_prompt = "word " * 5000
    r = httpx.post(
        server.base_url + "/v1/completions", json={"model": model_name, "prompt": long_prompt, "max_tokens": 4}
    )
    assert r.status_code == 400
    assert "context" in r.json()["error"]["message"] and r.json()["error"]["code"] == "context_length_exceeded"
    bad_ids = httpx.post(server.base_url + "/v1/completions", json={"model": model_name, "prompt": [1, 2, 10**9]})
    assert bad_ids.status_code == 400 and "vocabulary" in bad_ids.json()["error"]["message"]
    assert_still_serving(server)


def test_unknown_route_and_method(server):
    r = httpx.get(server.base_url + "/v1/nothing-here")
    assert r.status_code == 404 and "no endpoint" in r.json()["error"]["message"]
    r = httpx.get(server.base_url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------------------- metrics
def test_metrics_count_requests_and_tokens(server, openai_client, model_name):
    def sample(text: str, name: str, **labels) -> float:
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = httpx.get(server.base_url + "/metrics").text
    openai_client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=5, temperature=0)
    httpx.post(server.base_url + "/v1/chat/completions", json={"model": model_name, "messages": []})
    after = httpx.get(server.base_url + "/metrics").text
    ok = dict(endpoint="/v1/chat/completions", method="POST", status="200")
    bad = dict(endpoint="/v1/chat/completions", method="POST", status="400")
    assert sample(after, "alignd_requests_total", **ok) == sample(before, "alignd_requests_total", **ok) + 1
    assert sample(after, "alignd_requests_total", **bad) == sample(before, "alignd_requests_total", **bad) + 1
    gen = "alignd_generation_tokens_total"
    assert (
        0
        < sample(after, gen, endpoint="/v1/chat/completions") - sample(before, gen, endpoint="/v1/chat/completions")
        <= 5
    )
    assert sample(after, "alignd_running_requests", endpoint="/v1/chat/completions") == 0
    assert "alignd_time_to_first_token_seconds_bucket" in after
