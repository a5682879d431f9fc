"""`desktune serve` under abuse on loopback: every bad request is an OpenAI-style 4xx JSON error (never a 500 or a
hang) and the next normal request is answered normally; 20 concurrent requests all finish; a client that leaves
early stops its generation."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
import requests
from fastapi.testclient import TestClient

from desktune.serving.settings import Limits, ServeSettings
from tests.test_serve import running

HI = [{"role": "user", "content": "hi"}]
LIMITS = Limits()  # the defaults: max_tokens 1024 (over the tiny model's context of 512), body 1 MiB
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def registry(tiny_model_dir):
    """The tiny base alone; its answers never end early (no stop ids), so lengths are exact."""
    from desktune.serving.registry import load_registry

    reg = load_registry(str(tiny_model_dir), {}, dtype="fp32", device="cpu")
    name = next(iter(reg.served))
    reg.served[name] = replace(reg.served[name], stop_ids=())
    return reg


@pytest.fixture(scope="module")
def name(registry) -> str:
    return next(iter(registry.served))


@pytest.fixture(scope="module")
def client(registry) -> Iterator[TestClient]:
    from desktune.serving.app import create_app

    with TestClient(create_app(registry, ServeSettings(limits=LIMITS)), raise_server_exceptions=False) as c:
        yield c


def _normal(post: Callable[..., Any], name: str) -> None:
    """A normal request after the abuse: answered normally."""
    r = post("/v1/chat/completions", json={"model": name, "messages": HI, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def _raw(fields: str) -> Callable[[str], bytes]:
    """A chat body with `fields` spliced in as raw JSON text (for what json.dumps cannot write)."""
    return lambda name: f'{json.dumps({"model": name, "messages": HI})[:-1]}, {fields}}}'.encode()


def _chat(**fields: Any) -> Callable[[str], bytes]:
    return lambda name: json.dumps({"model": name, "messages": HI, **fields}).encode()


# (case, body from the model's name, status, code, param, words the message must hold)
CASES: list[tuple[str, Callable[[str], bytes], int, str, str | None, str]] = [
    ("malformed JSON", lambda n: b'{"model": "x", "messages": [', 400, "invalid_json", None, "not valid JSON"),
    ("empty body", lambda n: b"", 400, "invalid_request", None, "body is empty"),
    ("array body", lambda n: b"[1, 2]", 400, "invalid_request", None, "not a JSON object"),
    ("missing model", lambda n: json.dumps({"messages": HI}).encode(), 400, "invalid_request", "model", "required"),
    ("missing messages", lambda n: json.dumps({"model": n}).encode(), 400, "invalid_request", "messages",
     "required"),
    ("max_tokens -1", _chat(max_tokens=-1), 400, "invalid_request", "max_tokens", "greater than or equal to 1"),
    ("max_tokens 10^9", _chat(max_tokens=10**9), 400, "max_tokens_too_large", "max_tokens", "at most 1024"),
    ("max_completion_tokens 10^9", _chat(max_completion_tokens=10**9), 400, "max_tokens_too_large", "max_tokens",
     "at most 1024"),
    ("max_tokens past the context", _chat(max_tokens=600), 400, "context_length_exceeded", "max_tokens",
     "context of 512 tokens"),
    ("max_tokens of 4000 digits", _raw('"max_tokens": ' + "9" * 4000), 400, "max_tokens_too_large", "max_tokens",
     "4000-digit number"),
    ("max_tokens as a string", _chat(max_tokens="5"), 400, "invalid_request", "max_tokens", "valid integer"),
    ("temperature -1", _chat(temperature=-1), 400, "invalid_request", "temperature", "greater than or equal to 0"),
    ("temperature NaN", _raw('"temperature": NaN'), 400, "invalid_json", None, "no NaN or Infinity"),
    ("top_p Infinity", _raw('"top_p": Infinity'), 400, "invalid_json", None, "no NaN or Infinity"),
    ("temperature -Infinity", _raw('"temperature": -Infinity'), 400, "invalid_json", None, "no NaN or Infinity"),
    ("temperature 1e400", _raw('"temperature": 1e400'), 400, "invalid_request", "temperature", "finite number"),
    ("stream as a string", _chat(stream="yes"), 400, "invalid_request", "stream", "valid boolean"),
    ("a lone surrogate", _chat(messages=[{"role": "user", "content": "a\ud800"}]), 400, "invalid_json", None,
     "hex escape"),
    ("bytes that are not UTF-8", lambda n: b'{"model": "\xff\xfe", "messages": []}', 400, "invalid_json", None,
     "not valid JSON"),
    ("nesting 100,000 deep", lambda n: b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", None,
     "recursion limit"),
    ("model ../../etc/passwd", lambda n: json.dumps({"model": "../../etc/passwd", "messages": HI}).encode(), 404,
     "model_not_found", "model", "'../../etc/passwd' not found"),
    ("an image part", _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400,
     "invalid_request", "messages.0.content", "messages.0.content"),
    ("5 MB body", lambda n: b'{"model": "' + b"x" * (5 << 20) + b'"}', 413, "request_too_large", None,
     "over 1048576 bytes"),
]


@pytest.mark.parametrize(("body", "status", "code", "param", "words"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_abuse_is_a_json_error_and_the_next_request_is_normal(client, name, body, status, code, param, words):
    r = client.post("/v1/chat/completions", content=body(name), headers=JSON)
    error = r.json()["error"]
    assert (r.status_code, error["code"], error["param"]) == (status, code, param), error
    assert words in error["message"] and len(error["message"]) < 200, error
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    _normal(client.post, name)


def test_text_plain_is_told_the_content_type(client, name):
    r = client.post("/v1/chat/completions", content=_chat(max_tokens=2)(name), headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]
    _normal(client.post, name)


def test_completions_abuse(client, name):
    cases = [(json.dumps({"model": name, "prompt": "a\ud800"}).encode(), "invalid_json"),  # was a 500
             (json.dumps({"model": name, "prompt": "a", "max_tokens": 10**9}).encode(), "max_tokens_too_large"),
             (json.dumps({"model": name, "prompt": ["a", "b"]}).encode(), "invalid_request")]
    for body, code in cases:
        r = client.post("/v1/completions", content=body, headers=JSON)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
    _normal(client.post, name)


def test_a_chunked_body_over_the_limit_is_refused(client, name):
    def five_mb() -> Iterator[bytes]:
        yield b'{"model": "'
        for _ in range(50):
            yield b"x" * (100 << 10)
        yield b'"}'

    r = client.post("/v1/chat/completions", content=five_mb(), headers=JSON)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    _normal(client.post, name)


def test_a_long_model_name_is_not_echoed_whole(client, name):
    r = client.get("/v1/models/" + "x" * 3000)
    assert r.status_code == 404 and "3002 characters" in r.text and len(r.text) < 300
    _normal(client.post, name)


def test_a_full_server_answers_429_with_retry_after(client, name):
    slots = client.app.state.context.slots
    held = [slots.take() for _ in range(LIMITS.max_concurrent)]
    try:
        r = client.post("/v1/chat/completions", json={"model": name, "messages": HI, "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        for release in held:
            release()
    _normal(client.post, name)


def test_a_tokenizer_refusal_is_a_400(registry):
    from desktune.serving.errors import ApiError
    from desktune.serving.prompts import completion_prompt

    with pytest.raises(ApiError) as e:
        completion_prompt(registry.tokenizer, "a\ud800")  # what a non-strict JSON parser would hand on
    assert e.value.status == 400 and e.value.param == "prompt"


class Tokens:
    """Counts generated tokens (one stopping-criterion call each), each slowed to `delay` seconds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from desktune.serving import generation

        self.count, self.delay, lock = 0, 0.0, threading.Lock()
        check = generation._Stop.__call__

        def counted(stop: Any, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            with lock:
                self.count += 1
            time.sleep(self.delay)
            return check(stop, input_ids, scores, **kwargs)

        monkeypatch.setattr(generation._Stop, "__call__", counted)

    def settled(self, quiet: float = 1.0, within: float = 8.0) -> int | None:
        """The count once it has not moved for `quiet` seconds; None if it still moves after `within`."""
        deadline, last, still_since = time.monotonic() + within, -1, time.monotonic()
        while time.monotonic() < deadline:
            if self.count != last:
                last, still_since = self.count, time.monotonic()
            elif time.monotonic() - still_since >= quiet:
                return last
            time.sleep(0.05)
        return None


def test_a_real_server_takes_20_at_once_and_stops_for_clients_that_leave(registry, name, monkeypatch):
    """uvicorn on a free loopback port; every wait bounded by a client timeout."""
    from desktune.serving.app import create_app

    tokens = Tokens(monkeypatch)
    with running(create_app(registry, ServeSettings())) as url:
        chat = f"{url}/v1/chat/completions"

        def one(_: int) -> int:
            body = {"model": name, "messages": HI, "max_tokens": 4}
            return requests.post(chat, json=body, timeout=60).status_code

        start = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            assert list(pool.map(one, range(20))) == [200] * 20  # serialised on the model, none refused
        assert time.monotonic() - start < 60
        _normal(lambda path, **kw: requests.post(f"{url}{path}", timeout=30, **kw), name)

        # 450 tokens at 25 ms each would hold the model for over 11 s; leaving must stop them within a token
        tokens.delay, long = 0.025, {"model": name, "messages": HI, "max_tokens": 450, "temperature": 0}
        body = {**long, "stream": True, "stop": ["x" * 20_000]}  # holds back every delta (450 tokens < 20,000 chars)
        with requests.post(chat, json=body, stream=True, timeout=30) as r:
            assert r.status_code == 200 and next(r.iter_lines()).startswith(b"data: ")
            before = tokens.count
        assert (after := tokens.settled()) is not None and after - before < 100, (before, tokens.count)
        _normal(lambda path, **kw: requests.post(f"{url}{path}", timeout=30, **kw), name)

        before = tokens.count
        with pytest.raises(requests.Timeout):
            requests.post(chat, json=long, timeout=1.0)
        assert (after := tokens.settled()) is not None and after - before < 200, (before, tokens.count)
        tokens.delay = 0.0
        _normal(lambda path, **kw: requests.post(f"{url}{path}", timeout=30, **kw), name)
