"""Zero-setup embedded MQTT broker (amqtt) for local runs and tests.

``EmbeddedBroker`` runs an amqtt broker on its own asyncio event loop in a dedicated daemon
thread of the calling process::

    with EmbeddedBroker() as b:          # free port on 127.0.0.1
        run_agents(b.url)                # "mqtt://127.0.0.1:PORT"

or in the foreground: ``python -m broker.embedded --port 1883``.

Limits of amqtt that callers must respect:

* amqtt speaks MQTT 3.1.1 only: clients must connect with ``protocol=MQTTv311``.
* amqtt has NO packet-size limit: a client can push a 256 MB publish and the broker will
  buffer it. Agents enforce payload limits themselves (reject before publishing and on
  receipt); use Mosquitto (``broker.mosquitto``) where the broker must enforce them.
* It delivers at the subscription's QoS (not min(publish, subscription)) and keeps no
  offline queue for anonymous sessions (clean_session=False does not help here).
* No authentication or ACL: every client may publish and subscribe anywhere. It is meant
  for a single trusted machine; bind to 127.0.0.1 unless you know what you are doing.

Configuration used: one TCP listener, the AnonymousAuth plugin only (no $SYS topics, no
packet/event loggers, nothing written to disk or to the current directory).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from typing import Any

from broker import BrokerError

__all__ = ["EmbeddedBroker", "amqtt_config", "main"]

_log = logging.getLogger(__name__)


def amqtt_config(host: str, port: int, *, max_connections: int = 0) -> dict[str, Any]:
    """The amqtt 0.12 broker configuration we use (dict form of ``amqtt.contexts.BrokerConfig``)."""
    return {
        "listeners": {
            "default": {
                "type": "tcp",
                "bind": f"{host}:{port}",
                "max_connections": max_connections,
            }
        },
        # Only anonymous auth: the default plugin set also publishes $SYS topics every 20 s and
        # logs every packet; both are dropped here.
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


def _quiet_amqtt_logs() -> None:
    # amqtt logs every connection at INFO and client disconnects as tracebacks at ERROR/WARNING
    # ("Unhandled exception in client loop"); keep it to real problems only.
    for name in ("amqtt", "transitions"):
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET:
            lg.setLevel(logging.CRITICAL if name == "amqtt" else logging.WARNING)


def _one_line(exc: BaseException) -> str:
    text = f"{exc}" or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return " ".join(text.split())


class EmbeddedBroker:
    """An amqtt MQTT 3.1.1 broker on a private event loop in a daemon thread.

    amqtt has no packet-size limit: agents enforce payload limits themselves.
    """

    def __init__(self, *, quiet: bool = True) -> None:
        self.host: str | None = None
        self.port: int | None = None
        self._quiet = quiet
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_evt: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- public API ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise BrokerError("embedded broker is not running")
        return f"mqtt://{self._connect_host()}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 15.0) -> str:
        """Start the broker on host:port (port 0: a free port) and return its URL.

        Returns once the port accepts TCP connections; raises BrokerError (one line) otherwise.
        """
        if self.running:
            raise BrokerError(f"embedded broker already running at {self.url}")
        try:
            import amqtt.broker  # noqa: F401
        except ImportError as exc:
            raise BrokerError(
                f"amqtt is not installed ({exc}): pip install 'posbfl-testbed[broker]'"
            ) from None
        if self._quiet:
            _quiet_amqtt_logs()
        self.host, self.port = host, None
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(
            target=self._thread_main, args=(host, int(port)), name=f"amqtt-broker:{port}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            self._abort()
            raise BrokerError(f"embedded broker on {host}:{port} did not start within {timeout:g}s")
        if self._error is not None:
            self._thread.join(5)
            self._thread = None
            raise BrokerError(f"embedded broker on {host}:{port} failed to start: {_one_line(self._error)}")
        # Broker.start() returns after asyncio.start_server() has called listen(): the port
        # accepts connections now. (No TCP probe: amqtt would keep the half-open probe
        # connection until shutdown.)
        assert self.port is not None
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down (disconnects all clients). Idempotent."""
        thread, loop, evt = self._thread, self._loop, self._stop_evt
        if thread is None:
            return
        if loop is not None and evt is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(evt.set)
            except RuntimeError:  # loop already closed
                pass
        thread.join(timeout)
        self._thread = None
        if thread.is_alive():
            raise BrokerError(f"embedded broker did not stop within {timeout:g}s")

    def serve_forever(self) -> None:
        """Block until the broker thread ends (stop() from another thread, or a signal)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)

    def __enter__(self) -> "EmbeddedBroker":
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self.url if self.running and self.port else "stopped"
        return f"<EmbeddedBroker {state}>"

    # -- internals -------------------------------------------------------------------------
    def _connect_host(self) -> str:
        h = self.host or "127.0.0.1"
        if h in ("0.0.0.0", ""):
            return "127.0.0.1"
        if h == "::":
            return "::1"
        return h

    def _abort(self) -> None:
        try:
            self.stop(timeout=5)
        except BrokerError:
            pass

    def _thread_main(self, host: str, port: int) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._serve(host, port))
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            if not self._ready.is_set():
                self._error = exc
            else:
                _log.error("embedded broker crashed: %s", _one_line(exc))
        finally:
            self._ready.set()
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            except Exception:  # noqa: BLE001
                pass
            loop.close()
            self._loop = None

    async def _serve(self, host: str, port: int) -> None:
        from amqtt.broker import Broker

        self._stop_evt = asyncio.Event()
        broker = Broker(amqtt_config(host, port), loop=asyncio.get_running_loop())
        # amqtt 0.12 iterates its subscription table across awaits (Broker._handle_client_session
        # publishes retained messages inside `for topic in self._subscriptions`), so a client
        # that subscribes meanwhile raises "dictionary changed size during iteration" and the
        # connecting client is dropped. Iterating over a snapshot avoids that.
        broker._subscriptions = _SnapshotDict(broker._subscriptions)
        await broker.start()
        try:
            self.port = _bound_port(broker) or port
            if not self.port:
                raise BrokerError("could not determine the listening port")
            self._ready.set()
            await self._stop_evt.wait()
        finally:
            try:
                await asyncio.wait_for(broker.shutdown(), 10)
            except Exception as exc:  # noqa: BLE001
                _log.debug("amqtt shutdown: %s", exc)


class _SnapshotDict(dict):
    """A dict whose iteration walks a copy of its keys/items (see EmbeddedBroker._serve)."""

    def __iter__(self):
        return iter(list(super().keys()))

    def items(self):  # type: ignore[override]
        return list(super().items())


def _bound_port(broker: Any) -> int | None:
    """The port the default listener actually bound (needed for port 0). amqtt 0.12 internals."""
    try:
        server = broker._servers["default"].instance
        return int(server.sockets[0].getsockname()[1])
    except Exception:  # noqa: BLE001
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m broker.embedded",
        description="Run the embedded amqtt MQTT 3.1.1 broker in the foreground (no auth, no "
        "packet-size limit; for a real deployment use Mosquitto: python -m broker.mosquitto).",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=1883, help="TCP port (0: pick a free one; default 1883)")
    p.add_argument("-v", "--verbose", action="store_true", help="show amqtt's own logs")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    b = EmbeddedBroker(quiet=not args.verbose)
    try:
        url = b.start(args.host, args.port)
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"embedded MQTT broker listening on {url} (MQTT 3.1.1; Ctrl-C to stop)", flush=True)

    def _on_signal(signum: int, _frame: object) -> None:
        threading.Thread(target=b.stop, daemon=True).start()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    b.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
