"""Typed client of alignd's native API (sync and async twins, typed request fields, typed errors).

It depends on :mod:`alignd.protocol` (the response models it shares with the server) and on nothing
else of alignd, so it can be used without the server's code or dependencies.
"""

from alignd.clients.client import Alignd, AsyncAlignd
from alignd.clients.errors import (
    AligndClientError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
)
from alignd.clients.types import ChatMessageParam, DecodingParams, GenerateParams, TextContentPartParam

__all__ = [
    "Alignd",
    "AsyncAlignd",
    "ChatMessageParam",
    "DecodingParams",
    "GenerateParams",
    "TextContentPartParam",
    "AligndClientError",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "UnprocessableEntityError",
]
