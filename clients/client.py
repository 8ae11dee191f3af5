"""Typed Python client for alignd's native endpoints: ``Alignd`` (sync) and ``AsyncAlignd`` (async).

The OpenAI-compatible endpoints are meant for the official ``openai`` package; this client covers
what it cannot: ``/generate`` with token ids, health and metrics. It depends on :mod:`alignd.protocol`
(the wire models it shares with the server) and nothing else of alignd.

    from alignd.clients import Alignd
    client = Alignd("http://127.0.0.1:8000")
    answer = client.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=32, temperature=0)
    print(answer.choices[0].text)
"""

from __future__ import annotations

import difflib
import enum
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, Final, Literal, TypeAlias

import httpx
from typing_extensions import Unpack

from alignd.clients.errors import APIConnectionError, APITimeoutError, status_error
from alignd.clients.types import GenerateParams
from alignd.protocol import ChatMessage, GenerateResponse, GenerateStreamEvent, HealthResponse

DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
# What httpx takes as a timeout (its private httpx._types.TimeoutTypes, spelt out).
_TimeoutTypes: TypeAlias = float | None | tuple[float | None, float | None, float | None, float | None] | httpx.Timeout


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


_GENERATE_FIELDS = tuple(GenerateParams.__annotations__)


def _check_generate_fields(method: str, params: dict[str, Any]) -> None:
    """A misspelt keyword raises here, before any I/O: the type annotation alone does not stop it
    at run time, and the server would only answer with a 400 after a round trip."""
    unknown = [key for key in params if key not in _GENERATE_FIELDS]
    if not unknown:
        return
    raise TypeError(
        f"{method}() got unexpected keyword argument(s) {', '.join(map(_unknown_field_hint, unknown))}; "
        f"valid ones: {', '.join(_GENERATE_FIELDS)}, timeout"
    )


def _unknown_field_hint(key: str) -> str:
    if key == "stream":  # a field of the wire request, chosen here by the method called
        return "'stream' (to stream, call generate_stream)"
    close = difflib.get_close_matches(key, _GENERATE_FIELDS, n=1)
    return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)


def _generate_body(method: str, params: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    """The JSON body of ``POST /generate``: the fields given, without those that are None."""
    _check_generate_fields(method, params)
    body = {key: value for key, value in params.items() if value is not None}
    if "messages" in body:
        body["messages"] = [
            message.model_dump(exclude_none=True) if isinstance(message, ChatMessage) else message
            for message in body["messages"]
        ]
    if stream:
        body["stream"] = True
    # Values are sent as given, not validated here: the server is the one judge of a request, and
    # its 400 says exactly what to fix (raised here as BadRequestError).
    return body


def _timeout_option(timeout: float | None) -> dict[str, Any]:
    # httpx takes timeout=None as "no timeout at all"; here None means "the client's default".
    return {"timeout": timeout} if timeout is not None else {}


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"message": response.text}}
        raise status_error(response, body)


class _StreamEnd(enum.Enum):
    """The type of the sentinel that marks the end of a stream (``data: [DONE]``)."""

    END = enum.auto()


_STREAM_END: Final = _StreamEnd.END


@contextmanager
def _transport_errors() -> Iterator[None]:
    """The one place where httpx's transport failures become the client's typed errors."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise APITimeoutError(str(exc) or "request timed out") from exc
    except httpx.TransportError as exc:
        raise APIConnectionError(str(exc) or type(exc).__name__) from exc


def _sse_event(response: httpx.Response, line: str) -> GenerateStreamEvent | Literal[_StreamEnd.END] | None:
    """One server-sent line: an event, None (not a data line), or _STREAM_END; an error event raises."""
    if not line.startswith("data: "):
        return None
    data = line[len("data: ") :]
    if data == "[DONE]":
        return _STREAM_END
    payload = json.loads(data)
    if "error" in payload:
        raise status_error(response, payload, status=500)
    return GenerateStreamEvent.model_validate(payload)


class Alignd:
    """Synchronous client. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: _TimeoutTypes = DEFAULT_TIMEOUT,
    ) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=_headers(api_key), timeout=timeout)

    def __enter__(self) -> Alignd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with _transport_errors():
            response = self._http.request(method, path, **kwargs)
        _raise_for_status(response)
        return response

    def health(self) -> HealthResponse:
        """Each engine's state (a 503 while the SFT engine is down raises, like any error status)."""
        return HealthResponse.model_validate(self._request("GET", "/health").json())

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/v1/models").json()["data"]]

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

    def generate(self, *, timeout: float | None = None, **params: Unpack[GenerateParams]) -> GenerateResponse:
        """``POST /generate``. The keyword arguments are the request fields (:class:`GenerateParams`:
        prompt or messages, max_tokens, temperature, ..., decoding); ``timeout`` overrides the
        client's, in seconds.

        Each choice has the text, its token ids, optional logprobs and, with
        ``decoding={"diagnostics": True, ...}``, ``alignment``: an :class:`alignd.protocol.AlignmentSummary`
        (reward, KL, cost and the decisions taken), else None.
        """
        body = _generate_body("generate", dict(params), stream=False)
        response = self._request("POST", "/generate", json=body, **_timeout_option(timeout))
        return GenerateResponse.model_validate(response.json())

    def generate_stream(
        self, *, timeout: float | None = None, **params: Unpack[GenerateParams]
    ) -> Iterator[GenerateStreamEvent]:
        """Streaming ``POST /generate``, with the same keyword arguments as :meth:`generate`: yields one
        event per new piece of text of a choice, then one with the usage. A choice's last event
        carries its ``alignment`` (an :class:`alignd.protocol.AlignmentSummary`) when diagnostics
        were asked for.

        The arguments are checked when called, not when first iterated.
        """
        body = _generate_body("generate_stream", dict(params), stream=True)
        return self._stream_events(body, timeout)

    def _stream_events(self, body: dict[str, Any], timeout: float | None) -> Iterator[GenerateStreamEvent]:
        options = _timeout_option(timeout)
        with _transport_errors(), self._http.stream("POST", "/generate", json=body, **options) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for_status(response)
            for line in response.iter_lines():
                event = _sse_event(response, line)
                if event is _STREAM_END:
                    return
                if event is not None:
                    yield event


class AsyncAlignd:
    """Asynchronous twin of :class:`Alignd`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: _TimeoutTypes = DEFAULT_TIMEOUT,
    ) -> None:
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=_headers(api_key), timeout=timeout)

    async def __aenter__(self) -> AsyncAlignd:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with _transport_errors():
            response = await self._http.request(method, path, **kwargs)
        _raise_for_status(response)
        return response

    async def health(self) -> HealthResponse:
        return HealthResponse.model_validate((await self._request("GET", "/health")).json())

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._request("GET", "/v1/models")).json()["data"]]

    async def metrics(self) -> str:
        return (await self._request("GET", "/metrics")).text

    async def generate(self, *, timeout: float | None = None, **params: Unpack[GenerateParams]) -> GenerateResponse:
        """``POST /generate``: see :meth:`Alignd.generate`."""
        body = _generate_body("generate", dict(params), stream=False)
        response = await self._request("POST", "/generate", json=body, **_timeout_option(timeout))
        return GenerateResponse.model_validate(response.json())

    def generate_stream(
        self, *, timeout: float | None = None, **params: Unpack[GenerateParams]
    ) -> AsyncIterator[GenerateStreamEvent]:
        """Streaming ``POST /generate`` (``async for event in client.generate_stream(...)``): see
        :meth:`Alignd.generate_stream`.

        A plain method returning an async iterator, so that the arguments are checked when called.
        """
        body = _generate_body("generate_stream", dict(params), stream=True)
        return self._stream_events(body, timeout)

    async def _stream_events(self, body: dict[str, Any], timeout: float | None) -> AsyncIterator[GenerateStreamEvent]:
        options = _timeout_option(timeout)
        with _transport_errors():
            async with self._http.stream("POST", "/generate", json=body, **options) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for_status(response)
                async for line in response.aiter_lines():
                    event = _sse_event(response, line)
                    if event is _STREAM_END:
                        return
                    if event is not None:
                        yield event
