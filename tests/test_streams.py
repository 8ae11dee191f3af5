"""alignd.models.streams.merge_streams: n choices' streams as one (no engine)."""

from __future__ import annotations

import asyncio

import pytest

from alignd.models.streams import merge_streams


async def numbers(start: int, count: int, closed: list[int], delay: float = 0.0):
    try:
        for i in range(start, start + count):
            await asyncio.sleep(delay)
            yield i
    finally:
        closed.append(start)


async def test_every_item_of_every_stream_arrives_once():
    closed: list[int] = []
    merged = [x async for x in merge_streams([numbers(0, 3, closed), numbers(10, 2, closed), numbers(20, 0, closed)])]
    assert sorted(merged) == [0, 1, 2, 10, 11] and sorted(closed) == [0, 10, 20]


async def test_an_error_in_one_stream_is_raised_and_the_others_are_closed():
    closed: list[int] = []

    async def failing():
        yield 99
        raise ValueError("engine died")

    with pytest.raises(ValueError, match="engine died"):
        async for _ in merge_streams([numbers(0, 1000, closed, delay=0.01), failing()]):
            pass
    await asyncio.sleep(0)
    assert closed == [0]  # the slow stream was cancelled and closed, not left running


async def test_closing_the_merged_stream_early_closes_them_all():
    closed: list[int] = []
    merged = merge_streams([numbers(0, 1000, closed, delay=0.01), numbers(100, 1000, closed, delay=0.01)])
    first = await anext(merged)
    await merged.aclose()
    assert first in (0, 100) and sorted(closed) == [0, 100]
