"""`desktune serve`: check the address and key, load the models, bind, and run uvicorn."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

from desktune.errors import DesktuneError
from desktune.serving.settings import ServeSettings, check_settings


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one clear message (address in use, unknown host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise DesktuneError(f"cannot resolve the address ({e.strerror})", where=f"--host {host}") from e
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        hint = "choose another --port (0: any free one)" if e.errno == errno.EADDRINUSE else None
        raise DesktuneError(f"cannot listen on {host}:{port} ({e.strerror})", where="desktune serve",
                            fix=hint) from e
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket) -> str:
    """http://host:port of a listening socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(settings: ServeSettings, *, model: str | None = None, adapters: dict[str, Path] | None = None,
          dtype: str = "auto", device: str = "auto", quant: str = "none", log: Any = print) -> None:
    """Serve until interrupted (the checks come before anything is loaded)."""
    import uvicorn

    from desktune.serving.app import create_app
    from desktune.serving.registry import load_registry

    check_settings(settings)
    sock = bind(settings.host, settings.port)
    registry = load_registry(model, adapters or {}, dtype=dtype, device=device, quant=quant)
    app = create_app(registry, settings)
    keyed = "API key required" if settings.api_key else "no API key (loopback only)"
    log(f"serving {', '.join(registry.served)} at {url(sock)}/v1 ({keyed}); Ctrl-C stops")
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
