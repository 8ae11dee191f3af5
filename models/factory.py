"""Every engine is built here: the served engine (with its lifetime, an async context manager) and
the ``transformers`` reference engines that run beside it (a separate baseline model, extra reward
models, hidden-state probes). Nothing else constructs an engine class.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from alignd.errors import ConfigurationError
from alignd.models.adapters import AdapterInfo, load_adapter
from alignd.models.baseline_stack import BaselineStack
from alignd.models.engine import Engine, GenerationParams
from alignd.models.loading import merge_adapter, resolve_model_path
from alignd.settings import Settings

if TYPE_CHECKING:
    from alignd.models.hf_engine import HFEngine

# the name the default adapter baseline goes by (alignd.decoding.baselines.DEFAULT)
DEFAULT_BASELINE = "default"

logger = logging.getLogger(__name__)


def build_reference_engine(path: str | Path, settings: Settings, *, device: str | None = None) -> HFEngine:
    """The ``transformers`` engine of the model folder ``path`` (float32, context capped at
    ``settings.max_model_len``), on ``device`` (default: the CPU). It is the served engine under
    ``ALIGND_ENGINE=hf`` and the engine of every model that runs beside the served one: a separate
    baseline (``ALIGND_BASELINE_MODEL``), extra reward models, probe models. It can give hidden states
    (:attr:`Engine.supports_hidden_states`). Synchronous (it loads the weights): async callers run it
    in ``asyncio.to_thread``."""
    from alignd.models.hf_engine import HFEngine

    options = {} if device is None else {"device": device}
    return HFEngine.from_pretrained(path, max_model_len=settings.max_model_len, **options)


async def build_engine(settings: Settings, *, progress: bool = True) -> Engine:
    """The served engine of ``settings`` (``ALIGND_ENGINE``: vLLM, or the reference engine). On vLLM it
    runs LoRA adapters when some are configured and ``ALIGND_ADAPTER_SERVING`` is ``lora``."""
    path = await asyncio.to_thread(resolve_model_path, settings, progress=progress)
    if settings.sft_url:
        return await build_remote_sft_engine(path, settings)
    if settings.engine == "vllm":
        from alignd.models.vllm_engine import VLLMEngine

        lora = settings.adapter_serving == "lora" and bool(settings.adapter_folders())
        head = settings.value_head_dir()
        stack, card = (
            await asyncio.to_thread(implicit_baseline_stack, path, settings)
            if settings.implicit_in_engine
            else (None, None)
        )
        if head is None and stack is None:
            return VLLMEngine.start(path, settings, enable_lora=lora)
        served, manifest = await asyncio.to_thread(value_guided_model, path, head, settings, baseline=stack)
        return VLLMEngine.start(str(served), settings, enable_lora=lora, value_head=manifest, baseline_stack=card)
    return await asyncio.to_thread(build_reference_engine, path, settings)


def _remote_api_key(settings: Settings) -> str | None:
    """The bearer token every remote vLLM server gets (ALIGND_REMOTE_API_KEY), or None."""
    return settings.remote_api_key.get_secret_value() if settings.remote_api_key is not None else None


async def build_remote_sft_engine(model_dir: str | Path, settings: Settings) -> Engine:
    """The SFT model on the remote ``vllm serve`` at ``settings.sft_url``: this process reads only the
    tokenizer (and chat template) of ``model_dir``, which the remote must tokenize like. Down at start is
    no refusal: the engine is down (generation requests are 503s, /health says so) until the remote
    answers."""
    from transformers import AutoTokenizer

    from alignd.models.remote_engine import RemoteVLLMEngine

    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(model_dir))
    return await RemoteVLLMEngine.connect(
        "sft",
        settings.sft_url,
        tokenizer,
        model=settings.sft_served_model,
        api_key=_remote_api_key(settings),
        timeout_s=settings.remote_timeout_s,
        allow_down=True,
        max_model_len=settings.max_model_len,
        local_model_dir=str(model_dir),
    )


def value_guided_model(
    model_dir: str | Path, head_dir: Path | None, settings: Settings, *, baseline: BaselineStack | None = None
) -> tuple[Path, dict | None]:
    """The served model folder with the value head and/or a baseline stack attached (alignd's vLLM model class
    reads it), after checking that the head was made for these weights; and the head's manifest with its
    path (None without a head)."""
    import hashlib
    import json

    from alignd.models.value_head import load_value_head, prepare_value_guided_folder
    from alignd.models.weights import weights_digest

    manifest = None
    if head_dir is not None:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        head_dir = head_dir.resolve()
        loaded = load_value_head(
            head_dir,
            vocab_size=config.get("vocab_size"),
            hidden_size=config.get("hidden_size"),
            base_weights_digest=weights_digest(model_dir),
            base_name=settings.model_name,
        )
        manifest = {**loaded.manifest, "path": str(head_dir)}
    key = hashlib.sha256(f"{Path(model_dir).resolve()}|{head_dir}|{baseline}".encode()).hexdigest()[:16]
    served = prepare_value_guided_folder(
        model_dir, head_dir, settings.cache_dir / "value-guided" / key, baseline=baseline
    )
    return served, manifest


def implicit_baseline_stack(model_dir: str | Path, settings: Settings) -> tuple[BaselineStack, dict]:
    """The default baseline adapter merged into a second decoder stack of the served model
    (ALIGND_IMPLICIT_IN_ENGINE), and what the engine says of it; refused unless the adapter is a DPO or IRFT
    policy of these very weights (its manifest: kind, beta, base weights digest)."""
    from alignd.models.baseline_stack import IMPLICIT_KINDS, BaselineStack

    adapter_dir = settings.default_adapter_dir()
    if adapter_dir is None:
        raise ConfigurationError(
            "ALIGND_IMPLICIT_IN_ENGINE needs an adapter baseline (ALIGND_BASELINE_ADAPTER) "
            "trained by DPO or IRFT from the served model"
        )
    adapter = load_adapter(DEFAULT_BASELINE, adapter_dir, model_dir, max_rank=settings.max_lora_rank)
    kind, beta = adapter.manifest.get("kind"), adapter.manifest.get("beta")
    if (
        kind not in IMPLICIT_KINDS
        or beta is None
        or not (adapter.manifest.get("base_model") or {}).get("weights_digest")
    ):
        raise ConfigurationError(
            f"ALIGND_IMPLICIT_IN_ENGINE: adapter {adapter_dir} is not a DPO or IRFT policy of the served model with "
            "its beta and base weights digest in its manifest (alignd_adapter.json); unset the setting, or train "
            "the adapter with 'alignd train dpo|irft'"
        )
    merged = merge_adapter(model_dir, adapter.path, settings.cache_dir, progress=False)
    stack = BaselineStack(path=str(Path(merged).resolve()), beta=float(beta), name=str(adapter.path), skip_unasked=True)
    return stack, {"adapter": str(Path(adapter.path).resolve()), "beta": float(beta)}


async def build_model_engine(path: str | Path, settings: Settings) -> Engine:
    """A second model beside the served one (a separate baseline folder, or a merged adapter), on the
    same kind of engine as the served model: vLLM when it serves, never transformers in the serving path
    (unless ``ALIGND_ENGINE=hf``). Warmed up; the caller shuts it down."""
    if settings.engine == "vllm":
        from alignd.models.vllm_engine import VLLMEngine

        engine: Engine = VLLMEngine.start(str(path), settings)
    else:
        engine = await asyncio.to_thread(build_reference_engine, path, settings)
    await warm_up(engine)
    return engine


async def build_adapter_engine(
    served: Engine, name: str, path: str | Path, settings: Settings
) -> tuple[Engine, AdapterInfo, bool]:
    """The served model with the adapter at ``path``, checked against the served weights: in the served
    vLLM engine itself (``ALIGND_ADAPTER_SERVING=lora``), or merged into a model folder that a second
    engine serves (``merged``). Returns (engine, adapter, whether the caller owns the engine and must
    shut it down). With a remote SFT model (``ALIGND_SFT_URL``) the adapter is the remote's LoRA module of
    the same name; this process checks the folder against the weights it was made for."""
    if served.kind == "remote":
        local = served.info.extra.get("local_model_dir")
        adapter = await asyncio.to_thread(
            load_adapter, name, path, local, max_rank=settings.max_lora_rank, lora_modules=settings.lora_target_modules
        )
        return served.with_adapter(name, str(adapter.path)), adapter, False
    as_lora = settings.engine == "vllm" and settings.adapter_serving == "lora"
    adapter = await asyncio.to_thread(
        load_adapter,
        name,
        path,
        served.info.model_path,
        max_rank=settings.max_lora_rank,
        lora_modules=settings.lora_target_modules if as_lora else None,
    )
    if settings.engine != "vllm":  # the reference engine merges the adapter into a copy of its weights
        return await asyncio.to_thread(served.with_adapter, name, str(adapter.path)), adapter, True
    if as_lora:
        return served.with_adapter(name, str(adapter.path)), adapter, False
    merged = await asyncio.to_thread(merge_adapter, served.info.model_path, adapter.path, settings.cache_dir)
    return await build_model_engine(merged, settings), adapter, True


async def build_remote_engine(
    name: str, url: str, served: Engine, settings: Settings, *, model: str | None = None
) -> Engine:
    """The model ``model`` (None: the only one) of the ``vllm serve`` deployment at ``url``, checked to
    tokenize like ``served`` (prompts travel as token ids). A remote that is merely down does not stop
    the start: its engine is down (its requests are 503s) until the remote answers. Its HTTP client is
    the caller's to close (``shutdown``)."""
    from alignd.models.remote_engine import RemoteVLLMEngine

    return await RemoteVLLMEngine.connect(
        name,
        url,
        served.tokenizer,
        model=model,
        api_key=_remote_api_key(settings),
        timeout_s=settings.remote_timeout_s,
        allow_down=True,
        max_model_len=served.info.max_model_len,
    )


async def build_remote_classifier(name: str, url: str, settings: Settings, *, model: str | None = None):
    """The classifier (reward model) ``model`` (None: the only one) of the ``vllm serve --runner pooling``
    deployment at ``url``; down at start is no refusal (scoring is a 503 until it answers). The caller
    closes it (``shutdown``)."""
    from alignd.models.remote_engine import RemoteVLLMClassifier

    return await RemoteVLLMClassifier.connect(
        name,
        url,
        model=model,
        api_key=_remote_api_key(settings),
        timeout_s=settings.remote_timeout_s,
        allow_down=True,
        max_model_len=settings.max_model_len,
    )


async def warm_up(engine: Engine) -> None:
    """One short request with log-probabilities, so kernel warm-up (about 25 s on the CPU backend)
    happens at start-up and not in the first user's request."""
    start = time.perf_counter()
    await engine.generate(engine.encode("Hello"), GenerationParams(max_tokens=4, temperature=0.0, logprobs=1), "warmup")
    logger.info("engine warmed up in %.1f s", time.perf_counter() - start)


@asynccontextmanager
async def open_engine(settings: Settings, *, progress: bool = True, warm: bool = True) -> AsyncIterator[Engine]:
    engine = await build_engine(settings, progress=progress)
    try:
        if warm and engine.kind != "remote":  # a remote warms itself up
            await warm_up(engine)
        yield engine
    finally:
        await engine.shutdown()
