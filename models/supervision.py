"""Bringing a dead in-process engine back, without restarting alignd.

vLLM runs its engine core in a child process; when that process dies (killed, out of memory, a kernel
fault), ``AsyncLLM.errored`` turns true and every request on it fails with ``EngineDeadError`` until a
new ``AsyncLLM`` is built. :class:`EngineSupervisor` does that: the first request or health check that
sees the death starts one restart task, which waits (backing off), replaces the engine and warms it up,
and tries again if that fails, up to ``len(RESTART_BACKOFF_S)`` attempts a death; then the engine stays
down, and /health says so, until alignd is restarted. Meanwhile requests on it get 503
``engine_unavailable`` with Retry-After (alignd.errors.EngineUnavailableError), as for a remote engine
that cannot be reached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from alignd.errors import EngineUnavailableError

logger = logging.getLogger(__name__)

# Seconds before each restart attempt after a death (vLLM's CPU engine takes about 10-60 s to start).
RESTART_BACKOFF_S = (1.0, 5.0, 15.0, 30.0, 60.0)
RETRY_AFTER_S = 15  # what a 503 tells the client while the engine restarts


class EngineSupervisor:
    """The restart state of one engine: ``replace`` builds a new engine in place of the dead one (and
    raises if it cannot); ``name`` is how messages and logs call it."""

    def __init__(self, name: str, replace: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self._replace = replace
        self._task: asyncio.Task | None = None
        self.restarts = 0  # successful restarts since start
        self.gave_up = False
        self.detail: str | None = None
        self.since: float | None = None  # time.time() of the death being handled

    @property
    def restarting(self) -> bool:
        return self._task is not None and not self._task.done()

    def notice_death(self, reason: str) -> None:
        """The engine was found dead: start the restart (once per death; nothing after giving up)."""
        if self.restarting or self.gave_up:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a metrics scrape in a worker thread: the next request or health check starts it
            return
        self.since = time.time()
        self.detail = f"{reason}; restarting"
        logger.error("engine '%s' died (%s): restarting it", self.name, reason)
        self._task = loop.create_task(self._restart(reason))

    def unavailable(self) -> EngineUnavailableError:
        if self.gave_up:
            return EngineUnavailableError(
                f"engine '{self.name}' is down: {self.detail} (restart alignd)", retry_after=RETRY_AFTER_S
            )
        return EngineUnavailableError(
            f"engine '{self.name}' is restarting after its engine process died ({self.detail}): retry shortly",
            retry_after=RETRY_AFTER_S,
        )

    async def _restart(self, reason: str) -> None:
        for attempt, wait in enumerate(RESTART_BACKOFF_S, start=1):
            await asyncio.sleep(wait)
            started = time.perf_counter()
            try:
                await self._replace()
            except Exception as exc:  # noqa: BLE001 - any failure to start is another attempt
                self.detail = f"{reason}; restart attempt {attempt} failed: {exc}"
                logger.exception("engine '%s': restart attempt %d failed", self.name, attempt)
                continue
            self.restarts += 1
            self.detail = self.since = None
            logger.warning(
                "engine '%s' restarted in %.1f s (attempt %d)", self.name, time.perf_counter() - started, attempt
            )
            return
        self.gave_up = True
        self.detail = f"{reason}; gave up after {len(RESTART_BACKOFF_S)} restart attempts"
        logger.error("engine '%s': %s", self.name, self.detail)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
