"""Before any route runs: the API key (constant-time compare) and the body-size limit, as plain ASGI; then
the body read as strict JSON (a route class)."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic_core import from_json

from desktune.serving.errors import error_response

Scope = dict[str, Any]


def key_matches(header: bytes | None, key: str) -> bool:
    """Whether `Authorization: Bearer KEY` carries `key`; digests are compared, so neither content nor length
    shows in the time taken."""
    if not header:
        return False
    scheme, _, given = header.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer":
        return False
    want = hashlib.sha256(key.encode()).digest()
    return hmac.compare_digest(hashlib.sha256(given.strip().encode("latin-1")).digest(), want)


class Guard:
    """ASGI middleware: 401 without the right key, 413 for a body over `max_body` bytes (read at most that)."""

    def __init__(self, app: Any, *, api_key: str | None, max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and not key_matches(headers.get(b"authorization"), self.api_key):
            await error_response(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                 headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit():
            await error_response(400, "bad Content-Length header")(scope, receive, send)
            return
        body = b"" if int(declared) > self.max_body else await _read(receive, self.max_body)
        if body is None or int(declared) > self.max_body:
            await error_response(413, f"the request body is over {self.max_body} bytes")(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)


async def _read(receive: Any, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit` bytes (the rest is not read)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A receive that hands out the body once, then waits on the real one (for the disconnect)."""
    sent = False

    async def again() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


_CONSTANT = re.compile(rb"[:,\[]\s*-?(NaN|Infinity)\b")


def strict_json(body: bytes) -> Any:
    """The body as RFC 8259 JSON (pydantic's parser): Python's json also takes NaN, Infinity and lone surrogates,
    which no JSON client sends and which reach the model as nonsense. Any failure is a JSONDecodeError."""
    try:
        return from_json(body, allow_inf_nan=False)
    except ValueError as e:
        hint = " (JSON has no NaN or Infinity)" if _CONSTANT.search(body) else ""
        raise json.JSONDecodeError(f"{e}{hint}", body.decode("utf-8", "replace"), 0) from e


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is read by `strict_json` (FastAPI's documented custom-request hook)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict
