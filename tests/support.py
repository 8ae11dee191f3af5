"""Plain helpers and constants shared by conftest.py and the test modules (import them from here, not
from conftest: ``from support import ...``; tests/ is on the path as the folder of the rootdir conftest,
the way prometheus_server and reward_plugins are found).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
# Tests share the user's model cache: the embedded model is converted once per machine.
CACHE_DIR = Path(os.environ.get("ALIGND_CACHE_DIR", Path.home() / ".cache" / "alignd"))
SERVER_START_TIMEOUT_S = 600


# vLLM's CPU backend binds an engine's OpenMP threads to one core (VLLM_CPU_OMP_THREADS_BIND=auto keeps the
# last core for the frontend, so on 2 cores every engine took core 0, the test engines all queued there, and
# core 1 served only HTTP). The session server's engine, which most tests use, gets core 0; every other test
# engine (in-process, tiny servers, stock vllm serve) core 1. A value set outside the tests is kept.
SESSION_ENGINE_CORES = "0"
OTHER_ENGINE_CORES = "1"
ENGINE_CORES_SET_OUTSIDE = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", OTHER_ENGINE_CORES)
# For one of two module servers started together: the session engine's core (idle while their tests run).
ON_THE_SESSION_CORE = {"VLLM_CPU_OMP_THREADS_BIND": ENGINE_CORES_SET_OUTSIDE or SESSION_ENGINE_CORES}


@dataclass(frozen=True)
class AdmissionLimits:
    running: int
    queued: int


# Admission limits of the session server (aligned decoding): small, so that tests can fill them
# (tests/test_production.py). Also the fixture `session_admission_limits`.
SESSION_ADMISSION_LIMITS = AdmissionLimits(running=4, queued=8)
SESSION_MAX_RUNNING_ALIGNED = SESSION_ADMISSION_LIMITS.running
SESSION_MAX_QUEUED_ALIGNED = SESSION_ADMISSION_LIMITS.queued


def load_bench(name: str):
    """bench/<name>.py as module ``bench_<name>`` (bench/ is not a package; bench/serve_overhead.py
    loads its siblings under the same names, so there is one copy of each)."""
    module_name = f"bench_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return sys.modules[module_name]


# bench/processes.py, imported by name as bench/serve_overhead.py imports it (one copy of the module)
sys.path.insert(0, str(BENCH))
from processes import ManagedProcess, NotReadyError, ProcessExitedError, free_port  # noqa: E402, F401


class ServerProcess(ManagedProcess):
    """``alignd serve`` on a free port with the tests' model cache and ``env_overrides``, started at once
    (call wait_ready); its log is .pytest_cache/server-<port>.log."""

    def __init__(self, env_overrides: dict[str, str] | None = None) -> None:
        self.port = free_port()
        env = {**os.environ, "ALIGND_CACHE_DIR": str(CACHE_DIR), "ALIGND_PORT": str(self.port)}
        env.update(env_overrides or {})
        super().__init__(
            [sys.executable, "-m", "alignd.cli", "serve"],
            name="alignd serve",
            log_path=REPO / ".pytest_cache" / f"server-{self.port}.log",
            base_url=f"http://127.0.0.1:{self.port}",
            ready_path="/health",
            env=env,
            start_timeout=SERVER_START_TIMEOUT_S,
            poll_interval=1.0,
            term_timeout=30,
            kill_timeout=10,
        )
        self.start()


TINY_SERVED_NAME = "tiny"


def tiny_server_env(model_dir: str | Path) -> dict[str, str]:
    """The settings of an ``alignd serve`` of a tiny vLLM model folder (conftest's ``tiny_vllm_dir``), served as
    ``tiny``: no adapter engine, no head (neither exists for a model other than the embedded one)."""
    return {
        "ALIGND_MODEL": str(model_dir),
        "ALIGND_SERVED_MODEL_NAME": TINY_SERVED_NAME,
        "ALIGND_MAX_MODEL_LEN": "256",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }


def read_eos_token_ids(model_dir: str | Path) -> tuple[int, ...]:
    """The end-of-text token ids of a Hugging Face model folder: the tokenizer's, the config's and the
    generation config's, together (vLLM stops on the tokenizer's and the config's, the transformers
    engine on the generation config's or else the config's)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value if v is not None)
        elif value is not None:
            ids.add(int(value))

    add(AutoTokenizer.from_pretrained(str(model_dir)).eos_token_id)
    add(AutoConfig.from_pretrained(str(model_dir)).eos_token_id)
    try:
        add(GenerationConfig.from_pretrained(str(model_dir)).eos_token_id)
    except OSError:  # no generation_config.json
        pass
    if not ids:
        raise ValueError(f"{model_dir}: no end-of-text token id in its tokenizer or configs")
    return tuple(sorted(ids))


def build_vllm_tiny_llama(path: Path, tokenizer_dir: Path) -> Path:
    """A random 2-layer Llama with 32-wide attention heads (the smallest vLLM's CPU attention runs;
    conftest's tiny Llama has 8-wide heads, which run in transformers only) and the tokenizer of
    ``tokenizer_dir``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # spread the logits: greedy choices far from ties
    model.save_pretrained(path)
    return path


TINY_HEAD_BASE_NAME = "tiny-vllm-llama"
TINY_HEAD_REWARD = "positivity"
TINY_HEAD_RANK = 16


def random_value_head(hidden_size: int, vocab_size: int, seed: int = 1):
    """A random value head (seeded) whose values spread over a few units."""
    import torch

    from alignd.models.value_head import ValueHead, ValueHeadConfig

    torch.manual_seed(seed)
    head = ValueHead(ValueHeadConfig(hidden_size=hidden_size, vocab_size=vocab_size, rank=TINY_HEAD_RANK))
    with torch.no_grad():
        head.out.weight.mul_(4.0)  # values spread over a few units
    return head.eval()


def save_tiny_head(head, folder: Path) -> Path:
    """``head`` saved as a head of the tiny vLLM model (its manifest names it, no weights digest)."""
    from alignd.models.value_head import save_value_head

    return save_value_head(
        head,
        folder,
        {
            "base_model": {"name": TINY_HEAD_BASE_NAME},
            "reward": TINY_HEAD_REWARD,
            "baseline": "none (a random head for tests)",
        },
    )


def vllm_serve_process(
    model_dir: str | Path,
    served_name: str,
    log_path: Path,
    *,
    max_model_len: int,
    port: int | None = None,
    extra_args: tuple[str, ...] = (),
    env_overrides: dict[str, str] | None = None,
) -> ManagedProcess:
    """Stock ``vllm serve`` of ``model_dir`` on loopback ``port`` (default: a free one; through
    bench/vllm_cli.py, the vllm-cpu shim), float32 and eager like alignd's engine, a 1 GiB KV cache, chunked
    prefill off (vllm-cpu 0.32), top-20 log-probabilities. Not started: use it as a context manager, then
    ``wait_ready``."""
    port = port or free_port()
    cmd = [
        sys.executable,
        str(BENCH / "vllm_cli.py"),
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        served_name,
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        str(max_model_len),
        "--no-enable-chunked-prefill",
        "--max-num-batched-tokens",
        "2048",
        "--max-logprobs",
        "20",
        "--generation-config",
        "vllm",
        *extra_args,
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env_overrides or {})}
    return ManagedProcess(
        cmd, name=f"vllm serve ({served_name})", log_path=log_path, base_url=f"http://127.0.0.1:{port}", env=env
    )


class InProcessServer:
    """An app (``alignd.server.app.create_app``) served by uvicorn on a free port, in a thread of the test
    process: real HTTP to an app built around an engine the test holds."""

    def __init__(self, app, loop: asyncio.AbstractEventLoop | None = None, *, start_timeout: float = 600) -> None:
        """``loop``: a running loop (in another thread) to serve on, where the app's engine lives (vLLM's
        output task stays on the loop that started it); default: a loop of the server's own thread."""
        import uvicorn

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.start_timeout = start_timeout
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._loop = loop
        self._done: concurrent.futures.Future | None = None

    def __enter__(self) -> InProcessServer:
        if self._loop is not None:
            self._done = asyncio.run_coroutine_threadsafe(self._server.serve(), self._loop)
        else:
            self._done = concurrent.futures.Future()
            threading.Thread(target=self._run_own_loop, name=f"uvicorn-{self.port}", daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        while not self._server.started:
            if self._done.done():  # the app failed to start: its error
                self._done.result()
                raise RuntimeError(f"the in-process server on port {self.port} exited before it started")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the in-process server on port {self.port} did not start in {self.start_timeout} s")
            time.sleep(0.05)
        return self

    def _run_own_loop(self) -> None:
        try:
            self._server.run()
        finally:
            self._done.set_result(None)

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._done.result(timeout=120)


TINY_ADAPTER_BETA = 0.2


def make_adapter(
    base_dir: Path,
    out: Path,
    *,
    rank: int = 4,
    digest: str | None = None,
    seed: int = 0,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    manifest: dict | None = None,
) -> Path:
    """A random (non-zero) LoRA adapter of the tiny model, with an alignd manifest naming its base (as if
    trained by DPO with beta TINY_ADAPTER_BETA for positivity; ``manifest`` replaces fields of it)."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignd.models.adapters import MANIFEST
    from alignd.models.weights import weights_digest

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # large enough to change the tiny model's greedy answers
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(4.0)
    peft_model.save_pretrained(str(out))
    fields = {
        "kind": "dpo",
        "beta": TINY_ADAPTER_BETA,
        "reward": "positivity",
        "base_model": {"name": "tiny", "path": str(base_dir), "weights_digest": digest or weights_digest(base_dir)},
    }
    (out / MANIFEST).write_text(json.dumps({**fields, **(manifest or {})}))
    return out


@contextmanager
def in_process_llm(model_dir: str | Path, *, max_num_seqs: int = 256):
    """vLLM's offline ``LLM`` on ``model_dir`` in this process, float32 and eager like alignd's engine, a
    1 GiB KV cache, chunked prefill off (seeded requests: alignd.models.seeded_sampling); shut down on exit."""
    import gc

    from vllm import LLM

    saved = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    engine = LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        seed=0,
        enable_chunked_prefill=False,
        max_num_batched_tokens=4096,
        max_num_seqs=max_num_seqs,
    )
    try:
        yield engine
    finally:
        engine.llm_engine.engine_core.shutdown()
        del engine
        gc.collect()
        if saved is None:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        else:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = saved


@contextmanager
def door_on_own_loop(engine, settings):
    """The door over ``engine`` (``alignd.decoding.generation.open_generation``), opened on an event loop of its
    own for sync tests: yields (generation, loop); closed, and the loop with it, on exit."""
    from contextlib import AsyncExitStack

    from alignd.decoding.generation import open_generation

    loop = asyncio.new_event_loop()
    exits = AsyncExitStack()
    try:
        yield loop.run_until_complete(exits.enter_async_context(open_generation(engine, settings))), loop
    finally:
        loop.run_until_complete(exits.aclose())
        loop.close()
