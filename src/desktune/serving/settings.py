"""What `desktune serve` is asked to do, checked before anything is loaded."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from desktune.errors import DesktuneError

API_KEY_ENV = "DESKTUNE_API_KEY"
LOOPBACK = "127.0.0.1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many generations may be in flight."""

    max_tokens: int = 1024  # the most tokens one answer may ask for
    max_prompt_tokens: int | None = None  # None: the model's context length
    max_body_bytes: int = 1 << 20
    # generating or waiting for the model, beyond that 429; each waiting one holds one of anyio's 40 threads
    max_concurrent: int = 32


@dataclass(frozen=True)
class ServeSettings:
    """The server's address, key and limits."""

    host: str = LOOPBACK
    port: int = 8000
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_settings(settings: ServeSettings) -> None:
    """Refuse an address open to a network without an API key, and limits that cannot work."""
    if not is_loopback(settings.host) and not settings.api_key:
        raise DesktuneError(f"binding {settings.host} opens the server to the network, and no API key is set",
                            where="desktune serve --host",
                            fix=f"set an API key (--api-key KEY or {API_KEY_ENV}=KEY), or serve on {LOOPBACK}")
    if settings.api_key is not None and len(settings.api_key) < 8:
        raise DesktuneError("the API key is shorter than 8 characters", where="--api-key",
                            fix="use a long random key: python -c 'import secrets; print(secrets.token_urlsafe())'")
    lim = settings.limits
    for name, value in [("--max-tokens-limit", lim.max_tokens), ("--max-body-bytes", lim.max_body_bytes),
                        ("--max-concurrent", lim.max_concurrent), ("--max-prompt-tokens", lim.max_prompt_tokens)]:
        if value is not None and value < 1:
            raise DesktuneError(f"must be at least 1 (got {value})", where=name)
    if not 0 <= settings.port <= 65535:
        raise DesktuneError(f"not a port number: {settings.port}", where="--port", fix="use 0-65535 (0: any free)")


def model_name(model: str) -> str:
    """The name a base model answers to: a local folder's name, a GGUF file's stem, else the name as given."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.stem
    return path.resolve().name if path.is_dir() else model


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """`NAME=PATH` or `PATH` (named after its folder, or its run for a run's adapter/) -> {name: path}."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if sep and _NAME.match(name):
            path = Path(rest)
        else:
            path = Path(spec)
            resolved = path.expanduser().resolve()
            name = resolved.parent.name if resolved.name == "adapter" else resolved.name
        if not _NAME.match(name):
            raise DesktuneError(f"not a usable model name: {name!r}", where=f"--adapter {spec}",
                                fix="name it: --adapter NAME=PATH (letters, digits, . _ : -)")
        if name in adapters:
            raise DesktuneError(f"two adapters are named {name!r}", where=f"--adapter {spec}",
                                fix="name them apart: --adapter NAME=PATH")
        adapters[name] = path
    return adapters
