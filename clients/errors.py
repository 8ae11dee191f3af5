"""Typed errors of the alignd client, mirroring the server's statuses (as the ``openai`` client does).

AligndClientError
├── APIConnectionError          (no answer: refused, reset, DNS)
│   └── APITimeoutError
└── APIStatusError              (the server answered with a 4xx/5xx; .status_code, .body, .param, .code)
    ├── BadRequestError         400
    ├── AuthenticationError     401
    ├── PermissionDeniedError   403
    ├── NotFoundError           404
    ├── UnprocessableEntityError 422
    ├── RateLimitError          429 (the server is at capacity: .retry_after says when to retry)
    └── InternalServerError     5xx (and errors reported inside a stream; 503 and 504 too)
"""

from __future__ import annotations

from typing import Any

import httpx


class AligndClientError(Exception):
    pass


class APIConnectionError(AligndClientError):
    pass


class APITimeoutError(APIConnectionError):
    pass


class APIStatusError(AligndClientError):
    def __init__(self, message: str, *, status_code: int, body: dict[str, Any], response: httpx.Response | None = None):
        super().__init__(f"{status_code}: {message}")
        self.message = message
        self.status_code = status_code
        self.body = body
        self.response = response
        error = body.get("error", {}) if isinstance(body, dict) else {}
        self.param = error.get("param")
        self.code = error.get("code")
        self.type = error.get("type")
        # Seconds the server asks to wait before retrying (429 at capacity, 503 queue timeout).
        retry_after = response.headers.get("Retry-After") if response is not None else None
        self.retry_after: float | None = float(retry_after) if retry_after and retry_after.isdigit() else None


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class PermissionDeniedError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class UnprocessableEntityError(APIStatusError):
    pass


class RateLimitError(APIStatusError):
    pass


class InternalServerError(APIStatusError):
    pass


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def status_error(response: httpx.Response, body: dict[str, Any], status: int | None = None) -> APIStatusError:
    """The one place that maps an HTTP status to an error class."""
    code = status if status is not None else response.status_code
    cls = _BY_STATUS.get(code, InternalServerError if code >= 500 else APIStatusError)
    message = body.get("error", {}).get("message", "") if isinstance(body, dict) else str(body)
    return cls(message or f"HTTP {code}", status_code=code, body=body, response=response)
