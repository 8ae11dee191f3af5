"""Typed exceptions of alignd.

Every layer raises these; ``alignd.server.errors`` is the one place that turns them into HTTP
responses in the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations


class AligndError(Exception):
    """Base class. ``status`` is the HTTP status the server answers with."""

    status: int = 500
    error_type: str = "internal_error"
    code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        # Seconds after which a retry is likely to succeed (sent as Retry-After with 429 and 503).
        self.retry_after = retry_after


class ClientError(AligndError):
    """The request is wrong; the message says what to fix."""

    status = 400
    error_type = "invalid_request_error"


class InvalidRequestError(ClientError):
    code = "invalid_request"


class ContextLengthError(ClientError):
    code = "context_length_exceeded"


class ModelNotFoundError(ClientError):
    status = 404
    error_type = "not_found_error"
    code = "model_not_found"


class NotFoundError(ClientError):
    status = 404
    error_type = "not_found_error"
    code = "not_found"


class AuthenticationError(ClientError):
    """Missing or wrong API key (OpenAI's shape: type invalid_request_error, code invalid_api_key)."""

    status = 401
    code = "invalid_api_key"


class PayloadTooLargeError(ClientError):
    status = 413
    code = "request_too_large"


class OverloadedError(ClientError):
    """Every slot and queue place of the request's family is taken: retry after ``retry_after`` s."""

    status = 429
    error_type = "rate_limit_error"
    code = "server_overloaded"


class ServerError(AligndError):
    """Something failed on our side; the request may be retried."""

    status = 500
    error_type = "internal_error"
    code = "internal_error"


class EngineNotReadyError(ServerError):
    status = 503
    error_type = "service_unavailable"
    code = "engine_not_ready"


class EngineUnavailableError(ServerError):
    """An engine this request needs (a remote vLLM deployment) cannot be reached or dropped the
    connection; other requests are unaffected, and the engine is tried again on the next request."""

    status = 503
    error_type = "service_unavailable"
    code = "engine_unavailable"


class ModelPreparationError(ServerError):
    code = "model_preparation_failed"


class RewardNotFoundError(ClientError):
    status = 404
    error_type = "not_found_error"
    code = "reward_not_found"


class RewardFailedError(ClientError):
    """A deployment's own reward callable raised: the request cannot be scored as given."""

    status = 422
    error_type = "reward_error"
    code = "reward_failed"


class ConfigurationError(AligndError):
    """The server's configuration is wrong (raised at start-up)."""

    code = "configuration_error"


class QueueTimeoutError(ServerError):
    """The request waited for a slot longer than the server allows; nothing was generated."""

    status = 503
    error_type = "service_unavailable"
    code = "queue_timeout"


class DeadlineExceededError(ServerError):
    """The request's deadline passed while it was generating; its engine work was stopped."""

    status = 504
    error_type = "timeout_error"
    code = "deadline_exceeded"
