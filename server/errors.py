"""The one place where errors become HTTP responses, in the OpenAI error shape:
``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignd.errors import AligndError

logger = logging.getLogger(__name__)

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    """The one statement of the error shape."""
    return ErrorResponse(error=ErrorDetail(message=message, type=error_type, param=param, code=code)).model_dump()


def error_body(exc: AligndError) -> dict:
    return _body(exc.message, exc.error_type, exc.param, exc.code)


def error_response(exc: AligndError) -> JSONResponse:
    """The HTTP response of a typed error, with the headers its status calls for."""
    headers = {}
    if exc.status in (429, 503):
        headers["Retry-After"] = str(exc.retry_after or 1)
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc), status_code=exc.status, headers=headers or None)


def _response(status: int, message: str, error_type: str, param: str | None = None, code: str | None = None):
    return JSONResponse(_body(message, error_type, param, code), status_code=status)


def _param_path(loc: tuple) -> str | None:
    if len(loc) == 2 and loc[0] == "header":
        return f"header {loc[1]}"  # header names have dashes, which the body rule below would drop
    parts = [p for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif "[" in str(p) or "-" in str(p) or str(p).startswith("function-"):
            continue  # pydantic's union-branch labels ("str", "list[int]", "function-after[...]")
        else:
            out += f".{p}" if out else str(p)
    return out or None


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "TextContentPart"}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A short message that says what to fix, from pydantic's error list."""
    messages: list[str] = []
    first_param = None
    for err in exc.errors():
        kind = err.get("type", "")
        loc = tuple(err.get("loc", ()))
        if kind == "json_invalid":
            detail = err.get("ctx", {}).get("error", "")
            return f"The request body is not valid JSON ({detail}): send a JSON object.", None
        param = _param_path(tuple(p for p in loc if not (isinstance(p, str) and p in _UNION_TAGS)))
        if kind == "extra_forbidden":
            text = f"unknown field '{param}': remove it (see GET /openapi.json for the accepted fields)"
        elif kind == "missing" and param is None:
            text = "the request body is empty: send a JSON object"
        elif kind == "missing":
            text = f"'{param}' is required"
        elif kind == "model_attributes_type" and param is None:
            text = "the request body must be a JSON object"
        else:
            msg = err.get("msg", "invalid value").removeprefix("Value error, ")
            text = f"{param}: {msg}" if param else msg
        if first_param is None:
            first_param = param
        if text not in messages:
            messages.append(text)
    return "; ".join(messages[:5]) or "invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AligndError)
    async def _aligned(request: Request, exc: AligndError):
        if exc.status >= 500 and exc.status not in (503, 504):  # overload and deadlines are not failures
            logger.error("request failed: %s", exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return _response(400, message, "invalid_request_error", param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no endpoint at {request.method} {request.url.path}; see GET /openapi.json"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return _response(
            exc.status_code, message, _STATUS_TYPES.get(exc.status_code, "invalid_request_error"), None, None
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _response(500, f"internal error ({type(exc).__name__}); the server keeps serving", "internal_error")


# Documented on every route, so the OpenAPI document (and schema-based fuzzers) know the error shape.
ERROR_RESPONSES: dict = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    401: {"model": ErrorResponse, "description": "Missing or invalid API key (when the server has keys)"},
    404: {"model": ErrorResponse, "description": "Unknown model or resource"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    500: {"model": ErrorResponse, "description": "Server error"},
    503: {"model": ErrorResponse, "description": "Engine not ready, or no slot free in time (see Retry-After)"},
}

# Routes that generate also answer these (admission control and deadlines).
GENERATION_ERROR_RESPONSES: dict = {
    **ERROR_RESPONSES,
    429: {"model": ErrorResponse, "description": "At capacity for this decoding family: retry after Retry-After s"},
    504: {"model": ErrorResponse, "description": "The request's deadline passed; its engine work was stopped"},
}
