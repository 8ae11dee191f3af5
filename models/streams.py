"""Merging async streams: the items of several async iterators as they come (n choices decoded at once,
one engine request per choice)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import TypeVar

T = TypeVar("T")


async def merge_streams(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of ``streams`` in the order they arrive. An error in one of them is raised here; closing
    the merged iterator (or that error) cancels the others and closes them all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async with aclosing(stream):
                async for item in stream:
                    await queue.put((item, None))
            await queue.put((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((done, exc))  # (unbounded: never waits, so a cancelled pump still reports)
            if isinstance(exc, asyncio.CancelledError):
                raise

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
