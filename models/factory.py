"""Builds the configured engine and owns its lifetime (an async context manager)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from alignd.models.engine import Engine, GenerationParams
from alignd.models.loading import resolve_model_path
from alignd.settings import Settings

logger = logging.getLogger(__name__)


async def build_engine(settings: Settings, *, progress: bool = True) -> Engine:
    path = await asyncio.to_thread(resolve_model_path, settings, progress=progress)
    if settings.engine == "vllm":
        from alignd.models.vllm_engine import VLLMEngine

        return VLLMEngine.start(path, settings)
    from alignd.models.hf_engine import HFEngine

    return await asyncio.to_thread(HFEngine.from_pretrained, path, max_model_len=settings.max_model_len)


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
        if warm:
            await warm_up(engine)
        yield engine
    finally:
        await engine.shutdown()
