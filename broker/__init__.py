"""MQTT brokers for the PoS-BFL testbed.

Two ways to get a broker:

* :class:`EmbeddedBroker` -- zero-setup, pure-Python (amqtt, MQTT 3.1.1 only), runs inside
  the orchestrator or as ``python -m broker.embedded --port N``.
* :func:`start_mosquitto` -- a real Mosquitto process from a rendered config (listener,
  per-device ACL, size limits, optional TLS); for deployments see ``python -m broker.mosquitto``.

The helpers here (``free_port``, ``parse_url``, ``wait_for_port``) have no third-party
dependencies; ``EmbeddedBroker`` and the Mosquitto helpers are imported lazily so that
``import broker`` works without the ``broker`` extra (amqtt) installed.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

__all__ = [
    "BrokerError",
    "EmbeddedBroker",
    "MosquittoProcess",
    "free_port",
    "parse_url",
    "render_acl",
    "render_config",
    "start_mosquitto",
    "wait_for_port",
]

DEFAULT_PORT = 1883


class BrokerError(RuntimeError):
    """A broker could not be started (or stopped); the message is one line."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on *host* that is free right now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def parse_url(url: str) -> tuple[str, int]:
    """Split ``mqtt://host:port`` or ``host:port`` (or ``host``, port 1883) into (host, port).

    Raises ValueError with a one-line message for anything else.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"bad broker URL {url!r}: expected mqtt://host:port or host:port")
    text = url.strip()
    if "://" not in text:
        text = "mqtt://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad broker URL {url!r}: {exc}") from None
    if parts.scheme not in ("mqtt", "tcp"):
        raise ValueError(f"bad broker URL {url!r}: scheme must be mqtt:// (got {parts.scheme}://)")
    host = parts.hostname
    if not host:
        raise ValueError(f"bad broker URL {url!r}: missing host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"bad broker URL {url!r}: unexpected path or query")
    if port is None:
        port = DEFAULT_PORT
    if not 0 < port < 65536:
        raise ValueError(f"bad broker URL {url!r}: port out of range")
    return host, port


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until a TCP connect to (host, port) succeeds; raise BrokerError after *timeout* s."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise BrokerError(f"nothing accepts connections on {host}:{port} after {timeout:g}s ({last})")
        time.sleep(0.05)


def __getattr__(name: str) -> Any:  # PEP 562: lazy imports (amqtt is an optional extra)
    if name == "EmbeddedBroker":
        from .embedded import EmbeddedBroker

        return EmbeddedBroker
    if name in ("start_mosquitto", "MosquittoProcess", "render_config", "render_acl"):
        from . import mosquitto

        return getattr(mosquitto, name)
    raise AttributeError(f"module 'broker' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .embedded import EmbeddedBroker
    from .mosquitto import MosquittoProcess, render_acl, render_config, start_mosquitto
