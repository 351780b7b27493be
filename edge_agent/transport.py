"""Thin MQTT shell (paho-mqtt 2.x, MQTT 3.1.1 so amqtt and Mosquitto both work).

QoS 1 everywhere; received messages are queued for the agent's single protocol thread.
Subscriptions are renewed on every (re)connect.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import paho.mqtt.client as mqtt

log = logging.getLogger("bfl.transport")


class TransportError(Exception):
    pass


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """mqtt://host:port, mqtts://host:port (TLS) or host:port -> (host, port, tls)."""
    tls = url.startswith("mqtts://")
    rest = url.split("://", 1)[1] if "://" in url else url
    if "://" in url and not url.startswith(("mqtt://", "mqtts://", "tcp://")):
        raise TransportError(f"broker URL {url!r}: use mqtt://HOST:PORT")
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host:
        host, port = rest, "8883" if tls else "1883"
    try:
        return host, int(port), tls
    except ValueError:
        raise TransportError(f"broker URL {url!r}: port must be a number") from None


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes


class Mqtt:
    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        will: tuple[str, bytes] | None = None,
        observer=None,
    ):
        """``observer`` (optional) gets ``sent(topic, nbytes)``, ``received(topic, nbytes)`` and
        ``connection(up)``, from any thread (the agent's Prometheus metrics)."""
        self.host, self.port, tls = parse_broker_url(url)
        self.url = url
        self.inbox: queue.Queue = queue.Queue()
        self.rx_msgs = self.rx_bytes = 0  # delivered to us by the broker, since the start
        self.subscriptions: list[str] = []
        self.connected = threading.Event()
        self.connects = 0
        # retained (topic, payload)s published again after each reconnection: a device's
        # "online" status (the broker published its will, "offline", when the link dropped)
        self.reannounce: list[tuple[str, bytes]] = []
        self.observer = observer
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        if username:
            c.username_pw_set(username, password)
        if tls or ca_file:
            c.tls_set(ca_certs=ca_file)
        if will:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.max_inflight_messages_set(64)
        c.reconnect_delay_set(1, 15)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c

    def connect(self, timeout: float = 15.0) -> None:
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise TransportError(
                f"cannot reach the MQTT broker at {self.host}:{self.port} ({exc.__class__.__name__}: {exc}); "
                "start one (e.g. `mosquitto -p 1883`) or check --broker"
            ) from None
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.client.loop_stop()
            raise TransportError(f"the MQTT broker at {self.host}:{self.port} did not accept the connection")

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def subscribe(self, *topics: str) -> None:
        for t in topics:
            if t not in self.subscriptions:
                self.subscriptions.append(t)
        if self.connected.is_set():
            self.client.subscribe([(t, 1) for t in topics])

    def unsubscribe(self, *topics: str) -> None:
        for t in topics:
            if t in self.subscriptions:
                self.subscriptions.remove(t)
        self.client.unsubscribe(list(topics))

    def publish(self, topic: str, payload: bytes, retain: bool = False, wait: float | None = None) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        self._last_publish = info
        if self.observer is not None:
            self.observer.sent(topic, len(payload))
        if wait:
            info.wait_for_publish(wait)

    def flush(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until what was published so far has left."""
        info = getattr(self, "_last_publish", None)
        if info is not None and self.connected.is_set():
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):  # not connected / already failed: nothing to wait for
                pass

    # -- paho callbacks (network thread) --

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        if self.subscriptions:
            client.subscribe([(t, 1) for t in self.subscriptions])
        self.connects += 1
        if self.connects > 1:
            for t, payload in self.reannounce:
                client.publish(t, payload, qos=1, retain=True)
        self.connected.set()
        if self.observer is not None:
            self.observer.connection(True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        if self.observer is not None:
            self.observer.connection(False)
        if reason_code != 0:
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, msg):
        self.rx_msgs += 1
        self.rx_bytes += len(msg.payload)
        if self.observer is not None:
            self.observer.received(msg.topic, len(msg.payload))
        self.inbox.put(Incoming(msg.topic, bytes(msg.payload)))
