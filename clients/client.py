"""Typed Python client for alignd's native endpoints: ``Alignd`` (sync) and ``AsyncAlignd`` (async).

The OpenAI-compatible endpoints are meant for the official ``openai`` package; this client covers
what it cannot: ``/generate`` with token ids, health and metrics.

    from alignd.clients import Alignd
    client = Alignd("http://127.0.0.1:8000")
    answer = client.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=32, temperature=0)
    print(answer.choices[0].text)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from alignd.clients.errors import APIConnectionError, APITimeoutError, status_error
from alignd.server.native.protocol import GenerateResponse, GenerateStreamEvent

DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _generate_body(kwargs: dict[str, Any]) -> dict[str, Any]:
    # Sent as given, not validated here: the server is the one judge of a request, and its 400
    # says exactly what to fix (raised here as BadRequestError).
    return {key: value for key, value in kwargs.items() if value is not None}


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"message": response.text}}
        raise status_error(response, body)


_STREAM_END = object()


@contextmanager
def _transport_errors():
    """The one place where httpx's transport failures become the client's typed errors."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise APITimeoutError(str(exc) or "request timed out") from exc
    except httpx.TransportError as exc:
        raise APIConnectionError(str(exc) or type(exc).__name__) from exc


def _sse_event(response: httpx.Response, line: str):
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

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout=DEFAULT_TIMEOUT):
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=_headers(api_key), timeout=timeout)

    def __enter__(self) -> Alignd:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        with _transport_errors():
            response = self._http.request(method, path, **kwargs)
        _raise_for_status(response)
        return response

    def health(self) -> dict:
        return self._request("GET", "/health").json()

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/v1/models").json()["data"]]

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

    def generate(self, *, timeout: float | None = None, **kwargs: Any) -> GenerateResponse:
        """``POST /generate``; keyword arguments are the request fields (prompt or messages,
        max_tokens, temperature, top_p, n, stop, seed, logprobs)."""
        kwargs.pop("stream", None)
        extra = {"timeout": timeout} if timeout is not None else {}
        response = self._request("POST", "/generate", json=_generate_body(kwargs), **extra)
        return GenerateResponse.model_validate(response.json())

    def generate_stream(self, *, timeout: float | None = None, **kwargs: Any) -> Iterator[GenerateStreamEvent]:
        """Streaming ``POST /generate``: yields one event per new piece of text, then the usage."""
        body = _generate_body({**kwargs, "stream": True})
        extra = {"timeout": timeout} if timeout is not None else {}
        with _transport_errors(), self._http.stream("POST", "/generate", json=body, **extra) as response:
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

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout=DEFAULT_TIMEOUT):
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=_headers(api_key), timeout=timeout)

    async def __aenter__(self) -> AsyncAlignd:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        with _transport_errors():
            response = await self._http.request(method, path, **kwargs)
        _raise_for_status(response)
        return response

    async def health(self) -> dict:
        return (await self._request("GET", "/health")).json()

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._request("GET", "/v1/models")).json()["data"]]

    async def metrics(self) -> str:
        return (await self._request("GET", "/metrics")).text

    async def generate(self, *, timeout: float | None = None, **kwargs: Any) -> GenerateResponse:
        kwargs.pop("stream", None)
        extra = {"timeout": timeout} if timeout is not None else {}
        response = await self._request("POST", "/generate", json=_generate_body(kwargs), **extra)
        return GenerateResponse.model_validate(response.json())

    async def generate_stream(self, *, timeout: float | None = None, **kwargs: Any) -> AsyncIterator[GenerateStreamEvent]:
        body = _generate_body({**kwargs, "stream": True})
        extra = {"timeout": timeout} if timeout is not None else {}
        with _transport_errors():
            async with self._http.stream("POST", "/generate", json=body, **extra) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for_status(response)
                async for line in response.aiter_lines():
                    event = _sse_event(response, line)
                    if event is _STREAM_END:
                        return
                    if event is not None:
                        yield event
