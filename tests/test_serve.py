"""`desktune serve` on loopback, driven by the official openai client: answers, streaming, adapters, limits, keys."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import requests
from openai import OpenAI

from desktune.serving.settings import Limits, ServeSettings, parse_adapters
from tests.tiny import tiny_config

KEY = "test-key-0123456789"
LIMITS = Limits(max_tokens=32, max_prompt_tokens=64, max_body_bytes=4096, max_concurrent=2)
HELLO = [{"role": "user", "content": "what is the sea? 3"}]


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """uvicorn serving `app` in a thread on a free loopback port; yields its base URL."""
    import uvicorn

    from desktune.serving.server import bind, url

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield url(sock)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def registry(tiny_model_dir, tmp_path_factory):
    """The tiny base with a tiny adapter trained to answer like a pirate, served as `pirate`."""
    from desktune.config import load_config
    from desktune.serving.registry import load_registry
    from desktune.training.loop import train

    tmp = tmp_path_factory.mktemp("serve")
    overrides = ["train.max_steps=40", "train.lr=3e-2", "lora.target_modules=all-linear"]
    cfg = load_config(tiny_config(tiny_model_dir, tmp, run_name="pirate"), overrides)
    adapter = train(cfg, quiet=True).adapter_dir
    return load_registry(str(tiny_model_dir), {"pirate": adapter}, dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def base_name(registry) -> str:
    return next(n for n, s in registry.served.items() if s.adapter is None)


@pytest.fixture(scope="module")
def app(registry):
    from desktune.serving.app import create_app

    return create_app(registry, ServeSettings(limits=LIMITS))


@pytest.fixture(scope="module")
def base_url(app) -> Iterator[str]:
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_lists_the_base_and_each_adapter(client, base_name):
    assert sorted(m.id for m in client.models.list()) == sorted([base_name, "pirate"])
    assert client.models.retrieve("pirate").id == "pirate"


def test_chat_answers_with_usage_and_the_adapter_changes_the_answer(client, base_name):
    tuned = client.chat.completions.create(model="pirate", messages=HELLO, max_tokens=24, temperature=0)
    base = client.chat.completions.create(model=base_name, messages=HELLO, max_tokens=24, temperature=0)
    answer = tuned.choices[0].message.content
    assert "ahoy" in answer and tuned.choices[0].finish_reason == "stop"  # it stopped on the end-of-turn token
    assert base.choices[0].message.content != answer and base.model == base_name
    assert tuned.usage.prompt_tokens > 0 and 0 < tuned.usage.completion_tokens < 24
    assert tuned.usage.total_tokens == tuned.usage.prompt_tokens + tuned.usage.completion_tokens
    again = client.chat.completions.create(model="pirate", messages=HELLO, max_tokens=24, temperature=0)
    assert again.choices[0].message.content == answer  # greedy: the same answer


def test_the_token_limit_ends_with_length(client, base_name):
    out = client.chat.completions.create(model=base_name, messages=HELLO, max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3


def test_stream_gives_the_same_answer_in_chunks(client):
    whole = client.chat.completions.create(model="pirate", messages=HELLO, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="pirate", messages=HELLO, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stream_ends_with_done(base_url):
    body = {"model": "pirate", "messages": HELLO, "max_tokens": 4, "stream": True}
    with requests.post(f"{base_url}/v1/chat/completions", json=body, timeout=30, stream=True) as r:
        lines = [line.decode() for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_completions_and_sampling(client, base_name):
    out = client.completions.create(model=base_name, prompt="the quick brown", max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.prompt_tokens > 0
    streamed = client.completions.create(model=base_name, prompt="the quick brown", max_tokens=5, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text
    seeded = [client.chat.completions.create(model="pirate", messages=HELLO, max_tokens=8, temperature=1.5,
                                             seed=7).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]  # sampled, reproducible with a seed


def test_stop_strings_cut_the_answer(client):
    out = client.chat.completions.create(model="pirate", messages=HELLO, max_tokens=24, temperature=0,
                                         stop=["matey"])
    assert "matey" not in out.choices[0].message.content and out.choices[0].finish_reason == "stop"


def _status(call: Any) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value.status_code, e.value.body


def test_each_limit_answers_its_status_with_a_json_error(client, app):
    chat = client.chat.completions.create
    cases = {
        404: lambda: chat(model="nope", messages=HELLO),
        400: lambda: chat(model="pirate", messages=HELLO, max_tokens=LIMITS.max_tokens + 1),
        413: lambda: chat(model="pirate", messages=[{"role": "user", "content": "the fox " * 60}]),
    }
    for status, call in cases.items():
        got, body = _status(call)
        assert got == status and set(body) >= {"message", "type", "code"}, (status, body)
    assert _status(lambda: chat(model="pirate", messages=[{"role": "user", "content": "x" * 5000}]))[0] == 413
    assert _status(lambda: chat(model="pirate", messages=HELLO, extra_body={"tools": []}))[1]["param"] == "tools"
    held = [app.state.context.slots.take() for _ in range(LIMITS.max_concurrent)]  # generations in flight
    try:
        assert _status(lambda: chat(model="pirate", messages=HELLO, max_tokens=2))[0] == 429
    finally:
        for release in held:
            release()
    assert chat(model="pirate", messages=HELLO, max_tokens=2).choices  # a slot is free again


def test_bad_json_and_unknown_paths_are_json_errors(base_url):
    bad = requests.post(f"{base_url}/v1/chat/completions", data=b"{not json",
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    missing = requests.get(f"{base_url}/v2/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    spec = requests.get(f"{base_url}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(spec["paths"])


def test_a_crash_is_a_bare_500(registry, monkeypatch):
    from desktune.serving import app as app_mod

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setattr(app_mod, "generate", boom)
    with running(app_mod.create_app(registry, ServeSettings(limits=LIMITS))) as url:
        r = requests.post(f"{url}/v1/chat/completions", json={"model": "pirate", "messages": HELLO})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error" and "secret" not in r.text


def test_the_api_key_is_checked_on_every_request(registry):
    from desktune.serving.app import create_app

    with running(create_app(registry, ServeSettings(api_key=KEY, limits=LIMITS))) as url:
        for key in (None, "wrong-key-0123456789", KEY[:-1]):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = requests.get(f"{url}/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert requests.get(f"{url}/openapi.json").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="wrong-key-0123456789", max_retries=0).models.list()
        good = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        assert good.chat.completions.create(model="pirate", messages=HELLO, max_tokens=2).choices


def test_key_comparison_is_digest_based():
    from desktune.serving.guard import key_matches

    assert key_matches(f"Bearer {KEY}".encode(), KEY) and key_matches(f"bearer {KEY}".encode(), KEY)
    assert not key_matches(KEY.encode(), KEY) and not key_matches(b"Bearer ", KEY) and not key_matches(None, KEY)


def test_a_network_bind_without_a_key_is_refused_before_loading(monkeypatch, capsys):
    from desktune import cli
    from desktune.serving import registry

    monkeypatch.delenv("DESKTUNE_API_KEY", raising=False)
    monkeypatch.setattr(registry, "load_registry", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr("sys.argv", ["desktune", "serve", "--host", "0.0.0.0"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "API key" in err and "Traceback" not in err


def test_adapter_names_from_specs(tmp_path):
    run = tmp_path / "my-run" / "adapter"
    assert parse_adapters([str(run), f"b={tmp_path / 'x'}"]) == {"my-run": run, "b": tmp_path / "x"}
    from desktune.errors import DesktuneError

    with pytest.raises(DesktuneError, match="two adapters"):
        parse_adapters([f"a={tmp_path}", f"a={tmp_path / 'y'}"])


def test_fuzz_the_openapi_description(base_url):
    """schemathesis against the live loopback server: no 5xx, every answer as documented."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 4
    runs = [(op, GenerationMode.POSITIVE) for op in operations]
    runs += [(op, GenerationMode.NEGATIVE) for op in operations if op.method.upper() == "POST"]  # GETs: no body
    for operation, mode in runs:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=30, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: Any) -> None:
            case.call_and_validate(base_url=base_url, checks=checks, timeout=30)

        fuzz()
