"""The life of one HTTP request around its engine work: its deadline, and what happens when the
client goes away (streaming or not): the work is cancelled, its engine requests aborted, its slot
freed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

from fastapi import Header, Request, Response
from fastapi.responses import StreamingResponse

T = TypeVar("T")

# nginx's "client closed request": recorded by the request metrics, never seen by the client.
CLIENT_CLOSED_REQUEST = 499


@dataclass
class RequestContext:
    """Per-request limits that live outside the body: the deadline (event-loop time) or None."""

    deadline: float | None = None
    timeout_s: float | None = field(default=None, repr=False)

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - asyncio.get_running_loop().time()

    def timeout(self) -> asyncio.Timeout:
        """A context manager that cancels the work inside it when the deadline passes."""
        return asyncio.timeout_at(self.deadline)


async def request_context(
    request: Request,
    x_request_timeout: Annotated[
        float | None,
        Header(
            gt=0,
            le=86400,
            description="Deadline of this request in seconds (queue wait included); capped by the server's "
            "request_timeout_s. When it passes, the engine work stops: 504 (or an error event in a stream).",
        ),
    ] = None,
) -> RequestContext:
    configured = request.app.state.settings.request_timeout_s or None
    limits = [t for t in (configured, x_request_timeout) if t]
    if not limits:
        return RequestContext()
    timeout = min(limits)
    return RequestContext(asyncio.get_running_loop().time() + timeout, timeout)


@dataclass
class AdmittedStream:
    """The server-sent events of an admitted request and the release of its slot (called by the
    response when the stream ends, whatever the reason)."""

    events: AsyncIterator[str]
    release: Callable[[], None]


async def _wait_for_disconnect(receive) -> None:
    # Called after the body was read: the server's next message is the disconnect.
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(
    request: Request, work: Awaitable[T], on_disconnect: Callable[[], None] | None = None
) -> T | Response:
    """Run ``work`` until it finishes or the client disconnects, whichever is first. A disconnect
    cancels the work (and with it every engine request it started)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task.done():
        watcher.cancel()
        return task.result()
    task.cancel()  # the client is gone
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if on_disconnect is not None:
        on_disconnect()
    return Response(status_code=CLIENT_CLOSED_REQUEST)


class EventStreamResponse(StreamingResponse):
    """A server-sent-events response that always watches for the client going away.

    Starlette only notices a gone client when a write fails (ASGI spec 2.4), which for aligned
    decoding can be seconds after it left; this response listens for ``http.disconnect`` itself,
    cancels the stream at once, closes the event iterator (so the engine work is aborted) and runs
    ``on_close`` (the admission slot) however the response ends."""

    def __init__(
        self,
        events: AsyncIterator[str],
        *,
        on_close: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close
        self._on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        streamer = asyncio.ensure_future(self.stream_response(send))
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({streamer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not streamer.done():
                streamer.cancel()
                if self._on_disconnect is not None:
                    self._on_disconnect()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await streamer
        finally:
            for task in (streamer, watcher):
                task.cancel()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            if self._on_close is not None:
                self._on_close()


async def respond(request: Request, work: Awaitable[T], on_disconnect: Callable[[], None]) -> T | Response:
    """The HTTP answer of a generation: ``work`` (validation, admission, and for a whole answer the
    generation) runs until done or until the client leaves; an admitted stream becomes an
    :class:`EventStreamResponse` that keeps watching."""
    result = await cancel_on_disconnect(request, work, on_disconnect)
    if isinstance(result, AdmittedStream):
        return EventStreamResponse(result.events, on_close=result.release, on_disconnect=on_disconnect)
    return result
