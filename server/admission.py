"""Admission control: a bounded number of running requests and a bounded queue per decoding family.

Aligned decoding (transfer_q, args, cd, best_of_n) costs tens to hundreds of engine calls per answer,
plain generation one; each family gets its own slots so that a burst of one cannot starve the other.
A request takes a slot before any engine work (and before a stream's headers, so a refusal is still
a status code): a free slot is taken at once, otherwise the request waits in a FIFO queue; when the
queue is full the answer is 429, when the wait outlasts ``max_queue_wait_s`` it is 503, both with a
``Retry-After`` estimated from how long slots are held. Nothing waits forever.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Iterable

from alignd.decoding.registry import ALIGNED, PLAIN, Family
from alignd.errors import DeadlineExceededError, OverloadedError, QueueTimeoutError
from alignd.settings import Settings


class Slot:
    """A held place among a family's running requests. ``release`` is idempotent."""

    def __init__(self, gate: FamilyGate) -> None:
        self._gate = gate
        self._started = asyncio.get_running_loop().time()
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._gate._release(asyncio.get_running_loop().time() - self._started)


class FamilyGate:
    def __init__(self, family: str, max_running: int, max_queued: int, on_reject=None) -> None:
        self.family = family
        self.max_running = max_running
        self.max_queued = max_queued
        self.running = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._mean_hold_s: float | None = None  # moving average of how long a slot is held
        self._on_reject = on_reject or (lambda family, reason: None)

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead drains max_running at a time."""
        hold = self._mean_hold_s if self._mean_hold_s is not None else 1.0
        return max(1, math.ceil(hold * (self.queued + 1) / self.max_running))

    async def acquire(self, wait_s: float, *, deadline_bound: bool = False) -> Slot:
        """A slot now, or after waiting at most ``wait_s`` seconds in the queue.

        ``deadline_bound`` says the wait was cut short by the request's own deadline (then the
        refusal is a deadline error, not the server's queue timeout)."""
        if self.running < self.max_running and not self.queued:
            self.running += 1
            return Slot(self)
        if self.queued >= self.max_queued:
            self._on_reject(self.family, "queue_full")
            raise OverloadedError(
                f"the server is at capacity for {self.family} decoding ({self.max_running} running, "
                f"{self.max_queued} queued): retry later",
                retry_after=self.retry_after(),
            )
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(max(wait_s, 0.0)):
                await waiter
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as the wait ended: pass it on.
                Slot(self).release()
            else:
                waiter.cancel()
            if isinstance(exc, asyncio.CancelledError):
                raise
            if deadline_bound:
                raise DeadlineExceededError("the request's deadline passed while it waited for a slot") from None
            self._on_reject(self.family, "queue_timeout")
            raise QueueTimeoutError(
                f"no {self.family} decoding slot became free within {wait_s:g} s: retry later",
                retry_after=self.retry_after(),
            ) from None
        finally:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass
        return Slot(self)  # handed over by _release: ``running`` already counts it

    def _release(self, held_s: float) -> None:
        self._mean_hold_s = held_s if self._mean_hold_s is None else 0.8 * self._mean_hold_s + 0.2 * held_s
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the first waiter; ``running`` is unchanged
                return
        self.running -= 1


class AdmissionController:
    """The gates of both families, sized from the settings."""

    def __init__(self, settings: Settings, on_reject=None) -> None:
        self.max_queue_wait_s = settings.max_queue_wait_s
        self.gates = {
            ALIGNED: FamilyGate(ALIGNED, settings.max_running_aligned, settings.max_queued_aligned, on_reject),
            PLAIN: FamilyGate(PLAIN, settings.max_running_plain, settings.max_queued_plain, on_reject),
        }

    @staticmethod
    def family_of(families: Iterable[Family]) -> Family:
        """The family a request of several plans is admitted under: the costliest one."""
        return ALIGNED if ALIGNED in set(families) else PLAIN

    async def acquire(self, family: Family, remaining_s: float | None = None) -> Slot:
        """A slot of ``family``; ``remaining_s`` is what is left of the request's deadline."""
        wait = self.max_queue_wait_s
        bound = False
        if remaining_s is not None and remaining_s < wait:
            wait, bound = remaining_s, True
        return await self.gates[family].acquire(wait, deadline_bound=bound)
