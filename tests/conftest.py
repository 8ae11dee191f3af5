"""Shared fixtures: tiny random models, the embedded model, in-process engines, one real server.

Expensive things are session-scoped and start once per test session: the embedded model is converted
once; one SmolLM2 vLLM engine (``session_engine``) serves the session's alignd server (the real app on
real HTTP, in this process) and the engine tests; one stock ``vllm serve`` of SmolLM2
(``stock_vllm_serve``) and one of the tiny model (``tiny_stock_vllm_serve``) serve every module that
needs a stock server.

Test modules do not import this file: plain helpers and constants are in tests/support.py
(``from support import ...``), the rest are fixtures.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path

import pytest
from support import (
    CACHE_DIR,
    ENGINE_CORES_SET_OUTSIDE,
    SESSION_ADMISSION_LIMITS,
    SESSION_ENGINE_CORES,
    AdmissionLimits,
    InProcessServer,
    read_eos_token_ids,
)

from alignd.settings import Settings

# Fixtures that start a vLLM engine or the session server: a test that uses one (directly or through another
# fixture) is marked so, whatever its module says, so that `make test-fast` (-m "not server and not vllm")
# never starts an engine.
ENGINE_FIXTURES = {
    "server": "server",
    "vllm_engine": "vllm",
    "session_engine": "vllm",
    "stock_vllm_serve": "vllm",
    "tiny_stock_vllm_serve": "vllm",
}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        for fixture, marker in ENGINE_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, marker))


# The session's stock servers that a selected test needs: the session engine starts them (without waiting)
# before it boots itself, so that their engines boot on the other core meanwhile instead of when their
# first test asks (40 s and 20 s of the float32 suite's setups, measured on 2 cores: docs in README).
PRESTART: set[str] = set()
STOCK_SERVERS = ("stock_vllm_serve", "tiny_stock_vllm_serve")


def pytest_collection_finish(session) -> None:
    for name in STOCK_SERVERS:
        if any(name in getattr(item, "fixturenames", ()) for item in session.items):
            PRESTART.add(name)


class LoopThread:
    """An event loop in a background thread, so sync tests can drive async engines that must keep
    one loop for their whole life (vLLM's output task lives on it)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


# ---------------------------------------------------------------------------- tiny random model
TINY_CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "a happy answer is kind and warm and helpful",
    "numbers one two three four five six seven eight nine ten",
    "hello world how are you today i am fine thank you",
]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def build_tiny_llama(path: Path, *, seed: int = 0, vocab_target: int = 96) -> Path:
    """A random 2-layer Llama with a BPE tokenizer trained on a toy corpus, saved as a normal
    Hugging Face folder (so tests go through the real loading path)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Spread the logits so that greedy choices are not near-ties of a random init.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def build_tiny_classifier(path: Path, tokenizer_dir: Path, *, seed: int = 1) -> Path:
    """A random 2-layer Llama sequence classifier (one logit: a reward head) with the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    return build_tiny_classifier(tmp_path_factory.mktemp("tiny-classifier"), tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_vllm_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny model with heads vLLM's CPU attention runs (support.build_vllm_tiny_llama), for the modules
    that serve a tiny model from alignd or a stock ``vllm serve``."""
    from support import build_vllm_tiny_llama

    return build_vllm_tiny_llama(tmp_path_factory.mktemp("tiny-vllm-llama"), tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_head_dir(tiny_vllm_dir, tmp_path_factory) -> Path:
    """A random value head (seeded) for the tiny vLLM model."""
    import json

    from support import random_value_head, save_tiny_head

    config = json.loads((tiny_vllm_dir / "config.json").read_text())
    return save_tiny_head(
        random_value_head(config["hidden_size"], config["vocab_size"]), tmp_path_factory.mktemp("head")
    )


@pytest.fixture(scope="session")
def tiny_dpo_adapter(tiny_vllm_dir, tmp_path_factory) -> Path:
    """A random LoRA adapter of the tiny model whose manifest says DPO, beta TINY_ADAPTER_BETA
    (support.make_adapter)."""
    from support import make_adapter

    return make_adapter(tiny_vllm_dir, tmp_path_factory.mktemp("tiny-dpo-adapter") / "dpo", seed=11)


@pytest.fixture(scope="session")
def tiny_merged_baseline_dir(tiny_vllm_dir, tiny_dpo_adapter, tmp_path_factory) -> Path:
    """``tiny_dpo_adapter`` merged into the tiny model: the baseline of the implicit-Q tests."""
    from alignd.models.loading import merge_adapter

    return merge_adapter(tiny_vllm_dir, tiny_dpo_adapter, tmp_path_factory.mktemp("tiny-merge-cache"), progress=False)


@pytest.fixture(scope="session")
def tiny_baseline_stack(tiny_merged_baseline_dir):
    from support import TINY_ADAPTER_BETA

    from alignd.models.baseline_stack import BaselineStack

    return BaselineStack(path=str(tiny_merged_baseline_dir), beta=TINY_ADAPTER_BETA, name="dpo")


@pytest.fixture(scope="session")
def tiny_value_guided_dir(tiny_vllm_dir, tiny_head_dir, tiny_baseline_stack, tmp_path_factory) -> Path:
    """The tiny model's value-guided folder: alignd's model class with ``tiny_head_dir`` and the merged DPO
    baseline's stack (``tiny_baseline_stack``) named in its config, so that one engine (in process or on stock
    ``vllm serve``) serves the head, the implicit values and plain requests alike."""
    from alignd.models.value_head import prepare_value_guided_folder

    return prepare_value_guided_folder(
        tiny_vllm_dir, tiny_head_dir, tmp_path_factory.mktemp("served") / "tiny-tq", baseline=tiny_baseline_stack
    )


@pytest.fixture(scope="session")
def tiny_value_guided_llm(tiny_value_guided_dir) -> Iterator[object]:
    """vLLM's offline engine in this process on ``tiny_value_guided_dir``, float32 (support.in_process_llm):
    shared by the in-engine tests of the head (test_vllm_plugin) and of the implicit values (test_vllm_implicit),
    the last two modules of the run, so one engine start serves both."""
    from support import in_process_llm

    with in_process_llm(tiny_value_guided_dir) as engine:
        yield engine


@pytest.fixture(scope="session")
def tiny_stock_vllm_serve_started(tiny_value_guided_dir, tmp_path_factory):
    """The process of ``tiny_stock_vllm_serve``, started (not waited for); stopped at the session's end."""
    from support import TINY_SERVED_NAME, vllm_serve_process

    log = tmp_path_factory.mktemp("tiny-vllm-serve") / "vllm-serve.log"
    with vllm_serve_process(tiny_value_guided_dir, TINY_SERVED_NAME, log, max_model_len=256) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_stock_vllm_serve(tiny_stock_vllm_serve_started):
    """The session's one stock ``vllm serve`` of a tiny model: the value-guided folder (the plugin's tests ask
    it for the head; the remote-engine tests send it plain requests, which decode as plain Llama), served
    as ``tiny``, float32, chunked prefill off (support.vllm_serve_process)."""
    tiny_stock_vllm_serve_started.wait_ready(timeout=900)
    return tiny_stock_vllm_serve_started


@pytest.fixture(scope="session")
def tiny_hf_engine(tiny_llama_dir):
    from alignd.models.hf_engine import HFEngine

    return HFEngine.from_pretrained(tiny_llama_dir)


# ---------------------------------------------------------------------------- embedded model
@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The model cache the tests and their servers share (ALIGND_CACHE_DIR, else ~/.cache/alignd)."""
    return CACHE_DIR


@pytest.fixture(scope="session")
def embedded_model_dir(cache_dir) -> Path:
    from alignd.models.loading import prepare_embedded_model

    return prepare_embedded_model(cache_dir)


@pytest.fixture(scope="session")
def embedded_eos_token_ids(embedded_model_dir) -> frozenset[int]:
    """SmolLM2's end-of-text token ids, read from the embedded model folder's tokenizer and configs
    (what the engines stop on), rather than a bare number in a test."""
    return frozenset(read_eos_token_ids(embedded_model_dir))


@pytest.fixture(scope="session")
def embedded_settings(embedded_model_dir, cache_dir) -> Settings:
    # adapters as LoRAs in the engine, as the session server runs them (see session_server_env)
    return Settings(cache_dir=cache_dir, adapter_serving="lora")


@pytest.fixture(scope="session")
def vllm_engine(session_engine):
    """The session's in-process vLLM engine on the embedded model (``session_engine``: the one the session
    server serves, LoRA on, with the test value head in its model class; requests that do not ask for
    the head decode as plain Llama)."""
    return session_engine


@pytest.fixture(scope="session")
def hf_embedded_engine(embedded_model_dir):
    from alignd.models.hf_engine import HFEngine

    return HFEngine.from_pretrained(embedded_model_dir, max_model_len=2048)


# ---------------------------------------------------------------------------- the real server
def rewards_env(classifier_dir: Path) -> dict[str, str]:
    """Rewards the test servers are configured with, beside the built-in ones."""
    import json

    rewards = {
        # a 2-layer toy with 8-wide heads: transformers runs it (vLLM's CPU kernels need real head sizes)
        "tiny_rm": {"type": "classifier", "model": str(classifier_dir), "backend": "hf"},
        "exclaim": {"type": "callable", "path": "reward_plugins:exclamation_count"},
        "char_length": {"type": "callable", "path": "reward_plugins:batched_length", "batched": True},
        "broken": {"type": "callable", "path": "reward_plugins:broken"},
        "warm_and_short": {"type": "weighted_sum", "terms": {"positivity": 1.0, "length_penalty": 1.0}},
    }
    tests_dir = str(Path(__file__).parent)
    return {
        "ALIGND_REWARDS": json.dumps(rewards),
        "PYTHONPATH": tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


@pytest.fixture(scope="session")
def session_admission_limits() -> AdmissionLimits:
    """Aligned-decoding admission limits of the session server (running, queued): small, so that
    tests can fill them. (A server from ALIGND_TEST_SERVER_URL must be started with the same.)"""
    return SESSION_ADMISSION_LIMITS


class RunningServer:
    """A server started outside the test run (ALIGND_TEST_SERVER_URL), for quick iterations."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")


EMBEDDED_HEAD_RANK = 16


@pytest.fixture(scope="session")
def embedded_value_head_dir(embedded_model_dir, tmp_path_factory, model_name) -> Path:
    """A value head for the embedded model with known values (random, seeded): the session server scores TQ*
    with it inside its vLLM engine (decoding.value='head'), so every server test also runs on alignd's
    value-guided model class, where requests that do not ask for the head must decode as plain vLLM."""
    import json

    import torch

    from alignd.models.value_head import ValueHead, ValueHeadConfig, save_value_head
    from alignd.models.weights import weights_digest

    config = json.loads((embedded_model_dir / "config.json").read_text())
    torch.manual_seed(7)
    head = ValueHead(
        ValueHeadConfig(hidden_size=config["hidden_size"], vocab_size=config["vocab_size"], rank=EMBEDDED_HEAD_RANK)
    )
    with torch.no_grad():
        head.out.weight.mul_(4.0)  # values spread over a few units: at alpha 0.1 the head decides
    # as if distilled from the committed adapter, the session server's default baseline (a server finds the
    # head's baseline among its own by this digest)
    from alignd.settings import EMBEDDED_ADAPTER_DIR

    adapter = {
        "name": "default",
        "kind": "adapter",
        "source": str(EMBEDDED_ADAPTER_DIR),
        "weights_digest": weights_digest(EMBEDDED_ADAPTER_DIR),
    }
    manifest = {
        "base_model": {"name": model_name, "weights_digest": weights_digest(embedded_model_dir)},
        "reward": "positivity",
        "baseline": adapter,
        "note": "a random head for tests (tests/conftest.py)",
    }
    return save_value_head(head.eval(), tmp_path_factory.mktemp("embedded-value-head"), manifest)


@pytest.fixture(scope="session")
def session_server_env(tiny_classifier_dir, session_admission_limits, embedded_value_head_dir) -> dict[str, str]:
    """The settings the session server runs with, beside the defaults (a server from
    ALIGND_TEST_SERVER_URL must be started with the same)."""
    return {
        **rewards_env(tiny_classifier_dir),
        "ALIGND_MAX_RUNNING_ALIGNED": str(session_admission_limits.running),
        "ALIGND_MAX_QUEUED_ALIGNED": str(session_admission_limits.queued),
        # above the old schema bound of 64 prompts, which used to shadow the setting
        "ALIGND_MAX_PROMPTS_PER_REQUEST": "100",
        # A queued request is served however slow the machine: on CI's 2 cores, under the whole test
        # run, the 8 queued TQ* requests of the overload test waited longer than the default 60 s
        # and got 503 (the queue timeout has its own test, tests/test_admission.py).
        "ALIGND_MAX_QUEUE_WAIT_S": "600",
        # The committed adapter as a LoRA in the served engine rather than the default merged copy on a
        # second engine: one engine fewer in the test run (at most four at once on this machine), and the
        # LoRA path, whose vLLM bug (#16668) alignd works around, stays under test with the real server.
        # The merged path has its own test (tests/test_vllm_adapters.py).
        "ALIGND_ADAPTER_SERVING": "lora",
        "ALIGND_VALUE_HEAD": str(embedded_value_head_dir),
    }


@contextmanager
def environ(values: dict[str, str]):
    """``os.environ`` with ``values`` set, restored after (settings are read from it; an engine's processes
    inherit it when they start)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def session_settings(session_server_env, cache_dir) -> Settings:
    """The settings of the session server (its environment, ``session_server_env``, read as `alignd serve`
    reads its own)."""
    with environ({k: v for k, v in session_server_env.items() if k.startswith("ALIGND_")}):
        return Settings(cache_dir=cache_dir)


@pytest.fixture(scope="session")
def session_engine(session_settings, loop_thread, request):
    """The session's one SmolLM2 vLLM engine, opened as `alignd serve` opens it (the value-guided folder of
    the test head, the committed adapter as a LoRA, warmed up), on its own core: the session server serves
    it, and the tests of engine primitives use it directly (``vllm_engine``)."""
    from alignd.models.factory import open_engine

    for name in sorted(PRESTART):  # (their processes inherit the other core's binding: support.py)
        request.getfixturevalue(f"{name}_started")
    stack = AsyncExitStack()
    with environ({"VLLM_CPU_OMP_THREADS_BIND": ENGINE_CORES_SET_OUTSIDE or SESSION_ENGINE_CORES}):
        engine = loop_thread.run(stack.enter_async_context(open_engine(session_settings, progress=False)), timeout=1800)
    yield engine
    loop_thread.run(stack.aclose())


@pytest.fixture(scope="session")
def server(request, loop_thread):
    """The session's alignd server: the app `alignd serve` runs, over ``session_engine``, served by uvicorn on
    a free port in this process (on the engine's loop). ALIGND_TEST_SERVER_URL: a server started outside."""
    if os.environ.get("ALIGND_TEST_SERVER_URL"):
        yield RunningServer(os.environ["ALIGND_TEST_SERVER_URL"])
        return
    from alignd.server.app import create_app

    engine, settings = request.getfixturevalue("session_engine"), request.getfixturevalue("session_settings")
    with InProcessServer(create_app(settings, engine=engine), loop_thread.loop) as running:
        yield running


@pytest.fixture(scope="session")
def model_name(embedded_settings) -> str:
    return embedded_settings.model_name


@pytest.fixture
def openai_client(server):
    import openai

    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=600) as client:
        yield client


# ---------------------------------------------------------------------------- precision (tests/precision.py)
PRECISION_QUESTIONS = ("Tell me about your weekend.", "What is the capital of France?", "Count to 3:")


@pytest.fixture(scope="session")
def served_precision(server, hf_embedded_engine):
    """The session server's log-probability error against float32 transformers (tests/precision.py),
    measured on greedy answers to a few questions and printed."""
    from precision import measure_logprob_error, served_dtype, teacher_forced_logprobs

    from alignd.clients import Alignd

    served, reference = [], []
    with Alignd(server.base_url) as client:
        for question in PRECISION_QUESTIONS:
            messages = [{"role": "user", "content": question}]
            choice = client.generate(messages=messages, max_tokens=12, temperature=0, logprobs=5).choices[0]
            prompt = hf_embedded_engine.render_chat(messages)
            table = teacher_forced_logprobs(hf_embedded_engine.model, prompt, list(choice.token_ids))
            steps = [{t.token_id: t.logprob for t in step.top} for step in choice.logprobs]
            served.append(steps)
            reference.append([{t: float(table[i, t]) for t in step} for i, step in enumerate(steps)])
    error = measure_logprob_error(served, reference, served_dtype())
    print(f"\nsession server: {error}")
    return error


# ---------------------------------------------------------------------------- stock `vllm serve`
@pytest.fixture(scope="session")
def stock_vllm_serve_started(embedded_model_dir, embedded_value_head_dir, cache_dir, tmp_path_factory):
    """The process of ``stock_vllm_serve``, started (not waited for); stopped at the session's end."""
    from support import load_bench

    from alignd.models.value_head import prepare_value_guided_folder

    served = prepare_value_guided_folder(
        embedded_model_dir, embedded_value_head_dir.resolve(), tmp_path_factory.mktemp("stock") / "smollm2-tq"
    )
    settings = Settings(cache_dir=cache_dir)
    proc = load_bench("serve_overhead").start_vllm_server(
        str(served), settings, settings.cpu_kvcache_space_gib, tmp_path_factory.mktemp("stock-log")
    )
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def stock_vllm_serve(stock_vllm_serve_started):
    """The session's one stock ``vllm serve``: of the folder alignd prepares for the session server's value head
    (the same weights; alignd's model class and the head named in its config.json, so no flag beyond vLLM's
    own: the plugin comes from the installed entry points), with alignd's engine settings (the session's
    dtype) and under the session server's model name. The value-head tests compare it with alignd; the
    serving benchmarks run their load against it (plain requests on it decode as plain Llama)."""
    stock_vllm_serve_started.wait_ready(timeout=1800)  # a second SmolLM2 engine beside the session's: minutes
    return stock_vllm_serve_started
