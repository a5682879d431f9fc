"""The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, and /openapi.json."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from desktune.constants import VERSION
from desktune.serving import sse
from desktune.serving.errors import ERROR_RESPONSES, ApiError, excerpt, install_handlers
from desktune.serving.generation import Params, generate
from desktune.serving.guard import Guard, StrictJSONRoute
from desktune.serving.prompts import chat_prompt, completion_prompt
from desktune.serving.registry import Registry, Served
from desktune.serving.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)
from desktune.serving.settings import ServeSettings


def _stream_doc(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The 200 answer's second form: server-sent events whose data is a JSON chunk (or an error), then [DONE]."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in (chunk, ErrorResponse)]
    data = {"anyOf": [{"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json",
                                            "contentSchema": {"anyOf": refs}}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data, "event": {"type": "string"}}}
    return {200: {"description": "The answer; with stream=true, server-sent events ending with data: [DONE]",
                  "content": {"text/event-stream": {"schema": event}}}}


class Slots:
    """At most `n` generations in flight (one runs, the others wait for the model); beyond that 429."""

    def __init__(self, n: int) -> None:
        self._free = threading.BoundedSemaphore(n)

    def take(self) -> Any:
        """A release-once callable for a free slot, or ApiError 429."""
        if not self._free.acquire(blocking=False):
            raise ApiError(429, "too many generations in flight; retry shortly", headers={"Retry-After": "1"})
        done = threading.Event()

        def release() -> None:
            if not done.is_set():
                done.set()
                self._free.release()

        return release


@dataclass
class Context:
    """What the routes share."""

    registry: Registry
    settings: ServeSettings
    slots: Slots


def _served(ctx: Context, name: str) -> Served:
    served = ctx.registry.get(name)
    if served is None:
        raise ApiError(404, f"model {excerpt(name)} not found; GET /v1/models lists {', '.join(ctx.registry.served)}",
                       code="model_not_found", param="model")
    return served


def _params(ctx: Context, req: ChatRequest | CompletionRequest, prompt: list[int], asked: int | None,
            *, strip: bool) -> Params:
    """Check the prompt and the token limit against the server's limits and the model's context."""
    lim, context = ctx.settings.limits, ctx.registry.context
    prompt_limit = lim.max_prompt_tokens or context
    if prompt_limit is not None and len(prompt) > prompt_limit:
        raise ApiError(413, f"the prompt is {len(prompt)} tokens; this server takes at most {prompt_limit}",
                       code="prompt_too_long")
    if asked is not None and asked > lim.max_tokens:
        shown = asked if asked < 10**12 else f"a {len(str(asked))}-digit number"
        raise ApiError(400, f"max_tokens is {shown}; this server allows at most {lim.max_tokens}",
                       code="max_tokens_too_large", param="max_tokens")
    room = context - len(prompt) if context else lim.max_tokens
    if room < 1 or (asked is not None and asked > room):
        raise ApiError(400, f"the prompt ({len(prompt)} tokens) and max_tokens ({asked or 1}) exceed the model's "
                       f"context of {context} tokens", code="context_length_exceeded", param="max_tokens")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    seed = req.seed if req.seed is not None else secrets.randbits(63) if req.temperature > 0 else 0
    return Params(max_tokens=asked or min(lim.max_tokens, room), temperature=req.temperature, top_p=req.top_p,
                  seed=seed, stop=stop, strip=strip)


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def chat_completions(ctx: Context, req: ChatRequest, cancel: threading.Event) -> ChatCompletion | StreamingResponse:
    """POST /v1/chat/completions; setting `cancel` stops the generation."""
    served = _served(ctx, req.model)
    prompt = chat_prompt(ctx.registry.tokenizer, req.messages, served.chat_template)
    params = _params(ctx, req, prompt, req.max_completion_tokens or req.max_tokens, strip=True)
    release, rid = ctx.slots.take(), f"chatcmpl-{secrets.token_hex(12)}"
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        events = sse.chat_events(ctx.registry, served, prompt, params, rid=rid, usage=usage, cancel=cancel)
        return sse.response(events, release, cancel)
    try:
        out = generate(ctx.registry, served, prompt, params, cancel=cancel)
    finally:
        release()
    choice = ChatChoice(index=0, message=AssistantMessage(content=out.text), finish_reason=out.finish_reason)
    return ChatCompletion(id=rid, created=int(time.time()), model=served.name, choices=[choice],
                          usage=_usage(out.prompt_tokens, out.completion_tokens))


def completions(ctx: Context, req: CompletionRequest, cancel: threading.Event) -> Completion | StreamingResponse:
    """POST /v1/completions; setting `cancel` stops the generation."""
    served = _served(ctx, req.model)
    prompt = completion_prompt(ctx.registry.tokenizer, req.prompt)
    params = _params(ctx, req, prompt, req.max_tokens, strip=False)
    release, rid = ctx.slots.take(), f"cmpl-{secrets.token_hex(12)}"
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        events = sse.completion_events(ctx.registry, served, prompt, params, rid=rid, usage=usage, cancel=cancel)
        return sse.response(events, release, cancel)
    try:
        out = generate(ctx.registry, served, prompt, params, cancel=cancel)
    finally:
        release()
    choice = CompletionChoice(index=0, text=out.text, finish_reason=out.finish_reason)
    return Completion(id=rid, created=int(time.time()), model=served.name, choices=[choice],
                      usage=_usage(out.prompt_tokens, out.completion_tokens))


async def _until_gone(request: Request, cancel: threading.Event) -> None:
    """Set `cancel` when the client disconnects."""
    with contextlib.suppress(Exception):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        cancel.set()


async def _answer(request: Request, work: Callable[[threading.Event], Any]) -> Any:
    """`work(cancel)` in a worker thread, `cancel` set if the client leaves first: a timed-out client's answer
    stops at its next token instead of holding the model for all of max_tokens (a stream watches on its own)."""
    cancel = threading.Event()
    watcher = asyncio.ensure_future(_until_gone(request, cancel))  # asyncio: uvicorn's loop
    try:
        return await run_in_threadpool(work, cancel)
    finally:
        watcher.cancel()


def _this_server(spec: dict[str, Any], names: list[str], max_tokens: int) -> None:
    """Write this server's model names and token limit into the description (FastAPI's 422 out: 400 answers)."""
    for path in spec.get("paths", {}).values():
        for op in path.values():
            op.get("responses", {}).pop("422", None)
            for param in op.get("parameters", []):
                if param.get("name") == "model":
                    param["schema"]["enum"] = names
    schemas = spec.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for name in ("ChatRequest", "CompletionRequest"):
        fields = schemas[name]["properties"]
        fields["model"]["enum"] = names
        for key in ("max_tokens", "max_completion_tokens"):
            for form in fields.get(key, {}).get("anyOf", [fields.get(key, {})]):
                if form.get("type") == "integer":
                    form["maximum"] = max_tokens


def _openapi(app: FastAPI, settings: ServeSettings, names: list[str]) -> dict[str, Any]:
    """FastAPI's description, for this server (names, limit, bearer scheme), with the stream chunks."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _this_server(spec, names, settings.limits.max_tokens)
        schemas = spec.get("components", {}).get("schemas", {})
        for chunk in (ChatCompletionChunk, CompletionChunk):  # referenced by the event-stream answers
            js = chunk.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in js.pop("$defs", {}).items():
                schemas.setdefault(name, definition)
            schemas[chunk.__name__] = js
        if settings.api_key is not None:
            spec.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            spec["security"] = [{"bearer": []}]
        app.openapi_schema = spec
    return app.openapi_schema


def create_app(registry: Registry, settings: ServeSettings) -> FastAPI:
    """The app for one loaded registry, with its key, limits and error handlers."""
    app = FastAPI(title="desktune", version=VERSION, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API for a base model and its LoRA adapters.")
    ctx = Context(registry, settings, Slots(settings.limits.max_concurrent))
    app.router.route_class = StrictJSONRoute
    install_handlers(app)
    app.add_middleware(Guard, api_key=settings.api_key, max_body=settings.limits.max_body_bytes)
    app.state.context = ctx
    app.openapi = lambda: _openapi(app, settings, list(registry.served))  # type: ignore[method-assign]

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={**ERROR_RESPONSES, **_stream_doc(ChatCompletionChunk)})
    async def _chat(req: ChatRequest, request: Request) -> Any:
        return await _answer(request, lambda cancel: chat_completions(ctx, req, cancel))

    @app.post("/v1/completions", response_model=Completion,
              responses={**ERROR_RESPONSES, **_stream_doc(CompletionChunk)})
    async def _complete(req: CompletionRequest, request: Request) -> Any:
        return await _answer(request, lambda cancel: completions(ctx, req, cancel))

    model_errors = {k: ERROR_RESPONSES[k] for k in (401, 404, 500)}

    @app.get("/v1/models", response_model=ModelList, responses=model_errors)
    def _models() -> ModelList:
        return ModelList(data=[ModelCard(id=n, created=registry.created) for n in registry.served])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=model_errors)
    def _model(model: str) -> ModelCard:
        return ModelCard(id=_served(ctx, model).name, created=registry.created)

    return app
