"""Every failure as an OpenAI-style JSON error with the right status, never a stack trace."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from desktune.errors import DesktuneError
from desktune.serving.schemas import ErrorResponse

log = logging.getLogger("desktune.serve")

_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 500: "server_error"}
_CODES = {400: "invalid_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
          413: "request_too_large", 429: "too_many_requests", 500: "internal_error"}


class ApiError(Exception):
    """An error a request caused, answered with `status` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.code = code or _CODES.get(status, "error")


def excerpt(value: object, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters: an error message never echoes a whole request."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text)} characters)"


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """{"error": {"message", "type", "code", "param"}} for a status."""
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "code": code or _CODES.get(status, "error"), "param": param}}


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error response."""
    return JSONResponse(error_body(status, message, code=code, param=param), status_code=status, headers=headers)


_UNION_TAGS = {"str", "int", "float", "bool", "none"}  # pydantic names a union's member in the error's path


def _field(loc: tuple[Any, ...]) -> str | None:
    """The dotted path of a request field, without "body" and the union members pydantic adds to it."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and (
        p in _UNION_TAGS or "[" in p or p.startswith("constrained-")))]
    return ".".join(parts) or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """The first problem of a request body: message, the field's dotted path, code."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None, "invalid_request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error")
        return f"the request body is not valid JSON{f': {detail}' if detail else ''}", None, "invalid_json"
    param = _field(tuple(first.get("loc", ())))
    if param is None:  # the body as a whole: missing, or not an object
        problem = "empty" if first.get("type") == "missing" else "not a JSON object"
        return (f"the request body is {problem}; send a JSON object with Content-Type: application/json",
                None, "invalid_request")
    if first.get("type") == "extra_forbidden":
        return f"unsupported parameter: {param}", param, "unsupported_parameter"
    return f"{param}: {first.get('msg', 'invalid')}", param, "invalid_request"


def install_handlers(app: FastAPI) -> None:
    """Map validation errors to 400, HTTP errors and ApiError to their status, anything else to a bare 500."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return error_response(400, message, code=code, param=param)

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, code=exc.code, param=exc.param, headers=exc.headers)

    @app.exception_handler(DesktuneError)
    async def _user(_: Request, exc: DesktuneError) -> JSONResponse:
        return error_response(400, str(exc).splitlines()[0], code="invalid_request")

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)  # the server's log only
        return error_response(500, "internal server error")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [(400, "Invalid request"), (401, "Missing or wrong API key"), (404, "Unknown model"),
                         (413, "Body or prompt too large"), (429, "Too many concurrent generations"),
                         (500, "Server error")]
}
