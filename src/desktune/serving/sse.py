"""Streaming answers as OpenAI's server-sent events: chunks, an optional usage chunk, then `data: [DONE]`."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from desktune.serving.errors import error_body
from desktune.serving.generation import Outcome, Params, stream
from desktune.serving.registry import Registry, Served

log = logging.getLogger("desktune.serve")
Event = dict[str, Any]


def _usage(out: Outcome) -> dict[str, int]:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def _events(registry: Registry, served: Served, prompt: list[int], params: Params, *, usage: bool,
            head: Callable[[], Event], choice: Callable[[str | None, str | None], Event],
            cancel: threading.Event) -> Iterator[Event]:
    """The chunks of one streamed answer: `choice(text, finish_reason)` per delta and at the end."""
    for item in stream(registry, served, prompt, params, cancel):
        if isinstance(item, Outcome):
            yield {**head(), "choices": [choice(None, item.finish_reason)]}
            if usage:
                yield {**head(), "choices": [], "usage": _usage(item)}
        else:
            yield {**head(), "choices": [choice(item, None)]}


def chat_events(registry: Registry, served: Served, prompt: list[int], params: Params, *, rid: str,
                usage: bool, cancel: threading.Event) -> Iterator[Event]:
    """chat.completion.chunk events: the role first, then content deltas, then the finish reason."""
    created = int(time.time())

    def head() -> Event:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.name}

    def choice(text: str | None, finish: str | None) -> Event:
        delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    yield {**head(), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]}
    yield from _events(registry, served, prompt, params, usage=usage, head=head, choice=choice, cancel=cancel)


def completion_events(registry: Registry, served: Served, prompt: list[int], params: Params, *, rid: str,
                      usage: bool, cancel: threading.Event) -> Iterator[Event]:
    """text_completion events: text deltas, then the finish reason."""
    created = int(time.time())

    def head() -> Event:
        return {"id": rid, "object": "text_completion", "created": created, "model": served.name}

    def choice(text: str | None, finish: str | None) -> Event:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    yield from _events(registry, served, prompt, params, usage=usage, head=head, choice=choice, cancel=cancel)


def _lines(events: Iterator[Event], release: Callable[[], None]) -> Iterator[str]:
    """`data: JSON` lines; a failure mid-stream becomes an error event (the status is already sent)."""
    try:
        for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
    except Exception:
        log.exception("a streamed generation failed")  # the server's log only
        yield f"data: {json.dumps(error_body(500, 'internal server error'))}\n\n"
    finally:
        release()
    yield "data: [DONE]\n\n"


class _Stream(StreamingResponse):
    """A streamed answer that stops its generation and frees its slot when it ends or the client leaves. Told at
    the disconnect itself: starlette acts on it only after the worker thread's wait for the next text returns,
    which a held-back stop string or a run of special tokens can make last all of max_tokens."""

    def __init__(self, lines: Iterator[str], stop: Callable[[], None]) -> None:
        super().__init__(lines, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._stop = stop

    async def listen_for_disconnect(self, receive: Receive) -> None:
        await super().listen_for_disconnect(receive)
        self._stop()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:  # ASGI 2.4 servers: the client left mid-answer; nobody to tell
            pass
        finally:
            self._stop()


def response(events: Iterator[Event], release: Callable[[], None], cancel: threading.Event) -> StreamingResponse:
    """The streaming response; setting `cancel` stops its generation, its slot is released once."""

    def stop() -> None:
        cancel.set()
        release()

    return _Stream(_lines(events, release), stop)
