"""Admission control on its own (no server): slots, FIFO queue, refusals, hand-over on release,
and waiters that give up (timeout, cancelled client) never leak a slot."""

from __future__ import annotations

import asyncio

import pytest

from alignd.errors import DeadlineExceededError, OverloadedError, QueueTimeoutError
from alignd.server.admission import ALIGNED, PLAIN, AdmissionController, FamilyGate
from alignd.settings import Settings


async def test_free_slots_are_taken_at_once_and_the_queue_is_bounded():
    gate = FamilyGate(ALIGNED, max_running=2, max_queued=1)
    a, b = await gate.acquire(1), await gate.acquire(1)
    assert gate.running == 2
    waiting = asyncio.create_task(gate.acquire(5))
    await asyncio.sleep(0)
    assert gate.queued == 1
    with pytest.raises(OverloadedError) as refused:
        await gate.acquire(5)
    assert refused.value.status == 429 and refused.value.retry_after >= 1
    a.release()
    c = await waiting  # the released slot went to the waiter
    assert gate.running == 2 and gate.queued == 0
    a.release()  # idempotent
    assert gate.running == 2
    for slot in (b, c):
        slot.release()
    assert gate.running == 0


async def test_waiters_are_served_first_in_first_out():
    gate = FamilyGate(ALIGNED, max_running=1, max_queued=3)
    first = await gate.acquire(1)
    order = []

    async def wait(name):
        slot = await gate.acquire(5)
        order.append(name)
        await asyncio.sleep(0.01)
        slot.release()

    tasks = [asyncio.create_task(wait(n)) for n in "abc"]
    await asyncio.sleep(0.01)
    first.release()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c"] and gate.running == 0


async def test_a_wait_that_times_out_is_a_503_and_leaks_nothing():
    gate = FamilyGate(ALIGNED, max_running=1, max_queued=2)
    held = await gate.acquire(1)
    with pytest.raises(QueueTimeoutError) as timed_out:
        await gate.acquire(0.05)
    assert timed_out.value.status == 503 and timed_out.value.retry_after >= 1
    with pytest.raises(DeadlineExceededError):
        await gate.acquire(0.05, deadline_bound=True)
    assert gate.queued == 0
    held.release()
    assert gate.running == 0


async def test_a_cancelled_waiter_leaves_the_queue_and_the_slot_goes_on():
    gate = FamilyGate(ALIGNED, max_running=1, max_queued=2)
    held = await gate.acquire(1)
    gone = asyncio.create_task(gate.acquire(5))
    staying = asyncio.create_task(gate.acquire(5))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    held.release()
    slot = await staying
    assert gate.running == 1 and gate.queued == 0
    slot.release()
    assert gate.running == 0


async def test_a_slot_handed_over_as_the_waiter_is_cancelled_is_passed_on():
    gate = FamilyGate(ALIGNED, max_running=1, max_queued=2)
    held = await gate.acquire(1)
    unlucky = asyncio.create_task(gate.acquire(5))
    await asyncio.sleep(0)
    held.release()  # hands the slot to the waiter ...
    unlucky.cancel()  # ... which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await unlucky
    assert gate.running == 0  # the slot came back instead of leaking
    assert (await gate.acquire(0.1)) is not None


async def test_families_are_independent_and_sized_from_the_settings():
    control = AdmissionController(Settings(max_running_aligned=1, max_queued_aligned=0, max_running_plain=3))
    await control.acquire(ALIGNED)
    with pytest.raises(OverloadedError):
        await control.acquire(ALIGNED)
    slots = [await control.acquire(PLAIN) for _ in range(3)]  # plain requests are not held up
    assert control.gates[PLAIN].running == 3
    for slot in slots:
        slot.release()
