"""Broker tests with real paho-mqtt 2.x clients (MQTT 3.1.1) against both brokers.

Also a fan-out benchmark (not a test):
    python tests/test_broker.py --bench [--subs 20] [--msgs 20] [--size 1000000]
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

import broker
from broker import BrokerError, EmbeddedBroker, free_port, parse_url, wait_for_port
from broker import mosquitto as bm

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
class Client:
    """A paho 2.x client (VERSION2 callbacks, MQTTv311) collecting messages in a queue."""

    def __init__(self, url: str, client_id: str, *, username: str | None = None,
                 password: str | None = None, will: tuple[str, bytes, bool] | None = None,
                 keepalive: int = 30, connect: bool = True) -> None:
        self.host, self.port = parse_url(url)
        self.msgs: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack: list[mqtt.ReasonCode] = []
        self.subacked: queue.Queue[int] = queue.Queue()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if username is not None:
            c.username_pw_set(username, password)
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=will[2])
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *_a: self.disconnected.set()
        c.on_message = lambda _c, _u, m: self.msgs.put(m)
        c.on_subscribe = lambda _c, _u, mid, _rc, _p: self.subacked.put(mid)
        self.c = c
        self.keepalive = keepalive
        if connect:
            self.connect()

    def _on_connect(self, _c, _u, _flags, rc, _props) -> None:
        self.connack.append(rc)
        if not rc.is_failure:
            self.connected.set()

    def connect(self, timeout: float = 10) -> "Client":
        self.c.connect(self.host, self.port, keepalive=self.keepalive)
        self.c.loop_start()
        assert self.connected.wait(timeout), f"no CONNACK: {self.connack}"
        return self

    def subscribe(self, topic: str, qos: int = 1) -> None:
        _, mid = self.c.subscribe(topic, qos)
        assert self.subacked.get(timeout=10) == mid

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(30)

    def get(self, timeout: float = 10) -> mqtt.MQTTMessage:
        return self.msgs.get(timeout=timeout)

    def drain_until(self, topic: str, timeout: float = 10) -> list[mqtt.MQTTMessage]:
        """All messages received up to and including the first one on *topic*."""
        out = []
        while True:
            m = self.get(timeout)
            out.append(m)
            if m.topic == topic:
                return out

    def close(self) -> None:
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()


@pytest.fixture
def clients():
    made: list[Client] = []

    def make(*args, **kw) -> Client:
        cl = Client(*args, **kw)
        made.append(cl)
        return cl

    yield make
    for cl in made:
        try:
            cl.close()
        except Exception:
            pass


# ------------------------------------------------------------------------------------------
# both brokers
# ------------------------------------------------------------------------------------------
def test_qos1_fanout_1mb_to_5_subscribers(any_broker, clients):
    subs = [clients(any_broker, f"sub{i}") for i in range(5)]
    for s in subs:
        s.subscribe("bfl/v1/r1/blob/#", qos=1)
    pub = clients(any_broker, "pub")
    payload = os.urandom(1_000_000)
    pub.publish("bfl/v1/r1/blob/d00/abc", payload, qos=1)
    for s in subs:
        m = s.get(timeout=20)
        assert m.topic == "bfl/v1/r1/blob/d00/abc"
        assert m.qos == 1
        assert m.payload == payload


def test_retained_message_reaches_late_subscriber(any_broker, clients):
    pub = clients(any_broker, "operator")
    pub.publish("bfl/v1/r1/genesis", b"genesis-v1", qos=1, retain=True)
    pub.publish("bfl/v1/r1/genesis", b"genesis-v2", qos=1, retain=True)
    late = clients(any_broker, "late")
    late.subscribe("bfl/v1/r1/genesis", qos=1)
    m = late.get(timeout=10)
    assert (m.payload, m.retain) == (b"genesis-v2", True)


def test_last_will_on_abrupt_socket_loss(any_broker, clients):
    watcher = clients(any_broker, "watcher")
    watcher.subscribe("bfl/v1/devices/+/status", qos=1)
    dev = clients(any_broker, "d07", will=("bfl/v1/devices/d07/status", b"offline", True))
    dev.publish("bfl/v1/devices/d07/status", b"online", qos=1, retain=True)
    assert watcher.get().payload == b"online"
    # kill the TCP connection without an MQTT DISCONNECT (a crashed device / pulled cable)
    dev.c.loop_stop()
    sock = dev.c.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    sock.close()
    m = watcher.get(timeout=15)
    assert (m.topic, m.payload) == ("bfl/v1/devices/d07/status", b"offline")
    # the will was retained: a newcomer sees the device offline
    late = clients(any_broker, "late")
    late.subscribe("bfl/v1/devices/d07/status")
    assert late.get().payload == b"offline"


# ------------------------------------------------------------------------------------------
# mosquitto: ACL, authentication, packet limit
# ------------------------------------------------------------------------------------------
def needs_mosquitto(fn):
    """Mosquitto is a hard dependency of the suite (scripts/setup.sh installs it)."""
    return fn


@pytest.fixture
def secured_mosquitto(tmp_path):
    pw_tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    assert os.path.exists(pw_tool), "mosquitto_passwd not installed: sudo apt-get install mosquitto"
    acl = tmp_path / "acl"
    acl.write_text(bm.render_acl("bfl/v1", devices=["d01", "d02"]))
    pw = tmp_path / "passwd"
    subprocess.run([pw_tool, "-b", "-c", str(pw), "d01", "pw1"], check=True)
    subprocess.run([pw_tool, "-b", str(pw), "d02", "pw2"], check=True)
    subprocess.run([pw_tool, "-b", str(pw), "operator", "pwop"], check=True)
    with bm.start_mosquitto(tmp_path / "m", acl_file=acl, password_file=pw, allow_anonymous=False) as m:
        yield m


@needs_mosquitto
def test_mosquitto_acl_confines_each_device(secured_mosquitto, clients):
    url = secured_mosquitto.url
    op = clients(url, "op", username="operator", password="pwop")
    op.subscribe("bfl/v1/#")
    d2 = clients(url, "d02", username="d02", password="pw2")
    d2.subscribe("bfl/v1/r1/#")  # wide subscription is accepted; reads are filtered per message
    d1 = clients(url, "d01", username="d01", password="pw1")

    d1.publish("bfl/v1/r1/wtx/d01", b"mine")
    d1.publish("bfl/v1/r1/wtx/d02", b"forged")      # another device's subtree
    d1.publish("bfl/v1/r1/genesis", b"fake-genesis")  # operator only
    d1.publish("bfl/v1/r1/cmd/d02", b"fake-cmd")      # operator only
    d1.publish("bfl/v1/devices/d01/status", b"online")
    op.publish("bfl/v1/r1/genesis", b"genesis")
    op.publish("bfl/v1/r1/cmd/d01", b"private-to-d01")
    op.publish("bfl/v1/r1/cmd/d02", b"private-to-d02")
    d1.publish("bfl/v1/r1/vtx/d01/end", b"sentinel")

    seen_op = [(m.topic, m.payload) for m in op.drain_until("bfl/v1/r1/vtx/d01/end")]
    assert ("bfl/v1/r1/wtx/d01", b"mine") in seen_op
    assert ("bfl/v1/devices/d01/status", b"online") in seen_op
    assert ("bfl/v1/r1/genesis", b"genesis") in seen_op
    assert b"forged" not in [p for _, p in seen_op]
    assert b"fake-genesis" not in [p for _, p in seen_op]
    assert b"fake-cmd" not in [p for _, p in seen_op]

    seen_d2 = [(m.topic, m.payload) for m in d2.drain_until("bfl/v1/r1/vtx/d01/end")]
    assert ("bfl/v1/r1/wtx/d01", b"mine") in seen_d2
    assert ("bfl/v1/r1/cmd/d02", b"private-to-d02") in seen_d2
    assert ("bfl/v1/r1/cmd/d01", b"private-to-d01") not in seen_d2  # other devices' orders stay private
    assert b"forged" not in [p for _, p in seen_d2]


@needs_mosquitto
def test_mosquitto_rejects_bad_password_and_anonymous(secured_mosquitto):
    for user, password in (("d01", "wrong"), (None, None)):
        cl = Client(secured_mosquitto.url, "intruder", username=user, password=password, connect=False)
        cl.c.connect(cl.host, cl.port)
        cl.c.loop_start()
        try:
            deadline = time.monotonic() + 10
            while not cl.connack and time.monotonic() < deadline:
                time.sleep(0.02)
            assert cl.connack and cl.connack[0].is_failure, cl.connack
            assert not cl.connected.is_set()
        finally:
            cl.close()


def _publish_packet_size(topic: str, payload_len: int, qos: int = 1) -> int:
    rl = 2 + len(topic.encode()) + (2 if qos else 0) + payload_len
    n, x = 1, rl
    while x >= 128:
        x //= 128
        n += 1
    return 1 + n + rl


@needs_mosquitto
def test_mosquitto_drops_packets_over_max_packet_size(tmp_path, clients):
    with bm.start_mosquitto(tmp_path, max_packet_mb=1, allow_anonymous=True) as m:
        limit = 1 * MIB
        sub = clients(m.url, "sub")
        sub.subscribe("big/#")
        topic = "big/x"
        fits = limit - _publish_packet_size(topic, 0)
        while _publish_packet_size(topic, fits) > limit:
            fits -= 1
        assert _publish_packet_size(topic, fits) == limit
        pub = clients(m.url, "pub")
        pub.publish(topic, b"a" * fits)
        assert len(sub.get(timeout=10).payload) == fits

        # a payload of max+1 bytes: the broker drops it and cuts the client off. (mosquitto 2.0.11
        # counts 1 + remaining length, so it tolerates packets up to 3 bytes over the limit.)
        over = clients(m.url, "over")
        over.c.publish(topic, b"b" * (limit + 1), qos=0)
        assert over.disconnected.wait(10)
        over.c.loop_stop()
        pub.publish("big/end", b"end")
        got = sub.get(timeout=10)
        assert got.topic == "big/end", f"oversized packet was delivered ({len(got.payload)} bytes)"


def test_missing_mosquitto_binary_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(bm.shutil, "which", lambda *_a, **_k: None)
    monkeypatch.setattr(bm, "_DEFAULT_MOSQUITTO", str(tmp_path / "no-such-mosquitto"))
    with pytest.raises(BrokerError, match=r"^mosquitto not found: sudo apt-get install mosquitto$"):
        bm.start_mosquitto(tmp_path)


# ------------------------------------------------------------------------------------------
# config rendering, helpers, CLIs
# ------------------------------------------------------------------------------------------
def test_render_config_contents():
    conf = bm.render_config(1883, acl_file="/e/acl", password_file="/e/pw", max_packet_mb=64,
                            persistence_dir="/var/lib/mosquitto", allow_anonymous=False,
                            tls={"cafile": "/c/ca.crt", "certfile": "/c/s.crt", "keyfile": "/c/s.key", "port": 8883})
    lines = set(conf.splitlines())
    for want in ("per_listener_settings false", "listener 1883 0.0.0.0", "listener 8883 0.0.0.0",
                 "allow_anonymous false", "acl_file /e/acl", "password_file /e/pw",
                 f"max_packet_size {64 * MIB}", "persistence true",
                 "persistence_location /var/lib/mosquitto/", "log_dest stderr",
                 "cafile /c/ca.crt", "certfile /c/s.crt", "keyfile /c/s.key"):
        assert want in lines, want
    assert "message_size_limit" not in {ln.split()[0] for ln in lines if ln and not ln.startswith("#")}
    anon = bm.render_config(1884, bind="127.0.0.1", allow_anonymous=True)
    assert "allow_anonymous true" in anon and "acl_file" not in anon and "persistence false" in anon
    with pytest.raises(TypeError):
        bm.render_config(1883)  # allow_anonymous must be explicit (mosquitto 2.x)
    with pytest.raises(ValueError):
        bm.render_config(1883, allow_anonymous=True, tls={"certfile": "x"})


def test_render_acl_layout_and_validation():
    acl = bm.render_acl(devices=["d00", "d01"])
    lines = acl.splitlines()
    for kind in ("wtx", "vtx", "block", "blob", "report", "head", "ack", "sync", "chain"):
        assert f"pattern write bfl/v1/+/{kind}/%u/#" in lines
    assert "pattern write bfl/v1/devices/%u/#" in lines
    assert "pattern read bfl/v1/+/cmd/%u/#" in lines
    assert "user d00" in lines and "user d01" in lines and "user operator" in lines
    assert lines.index("topic write bfl/v1/+/genesis") > lines.index("user operator")
    assert "topic read bfl/v1/#" in bm.render_acl(devices=["d00"], private_cmd=False)
    for bad in (["d/1"], ["d+"], ["a b"], ["operator"], ["d1", "d1"], [""]):
        with pytest.raises(ValueError):
            bm.render_acl(devices=bad)


def test_acl_covers_every_kind_agents_publish():
    from edge_agent.protocol import messages

    assert messages.PREFIX == "bfl/v1"
    assert set(messages.RUN_KINDS) <= set(bm.DEVICE_KINDS)


def test_shipped_examples_match_renderer():
    devs = [f"d{i:02d}" for i in range(20)]
    shipped_acl = (ROOT / "broker/mosquitto/acl").read_text()
    assert bm.render_acl(devices=devs) in shipped_acl
    shipped_conf = (ROOT / "broker/mosquitto/mosquitto.conf").read_text()
    assert bm.render_config(1883, **bm.EXAMPLE_CONF_KWARGS) in shipped_conf


def test_parse_url():
    assert parse_url("mqtt://127.0.0.1:1884") == ("127.0.0.1", 1884)
    assert parse_url("broker.local:1883") == ("broker.local", 1883)
    assert parse_url("mqtt://broker") == ("broker", 1883)
    assert parse_url("localhost") == ("localhost", 1883)
    for bad in ("", "http://x:1", "mqtt://:1883", "mqtt://h:99999", "mqtt://h:abc", "mqtt://h:1/path"):
        with pytest.raises(ValueError) as ei:
            parse_url(bad)
        assert "\n" not in str(ei.value)


def test_wait_for_port_and_free_port():
    port = free_port()
    with pytest.raises(BrokerError):
        wait_for_port("127.0.0.1", port, timeout=0.2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        wait_for_port("127.0.0.1", port, timeout=2)


def test_embedded_broker_lifecycle_and_port_conflict():
    b = EmbeddedBroker()
    url = b.start()
    assert re.fullmatch(r"mqtt://127\.0\.0\.1:\d+", url) and b.url == url
    _, port = parse_url(url)
    try:
        with pytest.raises(BrokerError) as ei:
            EmbeddedBroker().start(port=port)
        assert "\n" not in str(ei.value)
    finally:
        b.stop()
    b.stop()  # idempotent
    again = EmbeddedBroker()  # the port is released
    assert again.start(port=port) == url
    again.stop()
    assert isinstance(broker.EmbeddedBroker, type)


def test_module_clis(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "broker.mosquitto", "render", "--devices", "d00..d02,x9",
                        "--out", str(tmp_path / "cfg")], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "mosquitto_passwd" in r.stdout
    acl = (tmp_path / "cfg/acl").read_text()
    assert all(f"user {d}" in acl for d in ("d00", "d01", "d02", "x9"))
    assert "allow_anonymous false" in (tmp_path / "cfg/mosquitto.conf").read_text()

    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "broker.embedded", "--port", str(port)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_port("127.0.0.1", port, 20)
        cl = Client(f"127.0.0.1:{port}", "cli")
        cl.close()
    finally:
        p.terminate()
        out, err = p.communicate(timeout=15)
    assert p.returncode == 0, err
    assert f"mqtt://127.0.0.1:{port}" in out


# ------------------------------------------------------------------------------------------
# benchmark: python tests/test_broker.py --bench
# ------------------------------------------------------------------------------------------
def bench_fanout(url: str, nsub: int = 20, nmsg: int = 20, size: int = 1_000_000) -> dict:
    total = nsub * nmsg
    done, lock, count = threading.Event(), threading.Lock(), [0]

    def on_msg(_c, _u, _m):
        with lock:
            count[0] += 1
            if count[0] == total:
                done.set()

    subs = []
    for i in range(nsub):
        cl = Client(url, f"bench-sub{i}")
        cl.c.on_message = on_msg
        cl.subscribe("bench/#", qos=1)
        subs.append(cl)
    pub = Client(url, "bench-pub")
    payload = os.urandom(size)
    t0 = time.perf_counter()
    infos = [pub.c.publish(f"bench/{i}", payload, qos=1) for i in range(nmsg)]
    for info in infos:
        info.wait_for_publish(300)
    ok = done.wait(600)
    dt = time.perf_counter() - t0
    for cl in [*subs, pub]:
        cl.close()
    return {"complete": ok, "deliveries": count[0], "seconds": round(dt, 2),
            "published_msgs_per_s": round(nmsg / dt, 1), "deliveries_per_s": round(count[0] / dt, 1),
            "MB_per_s_out": round(count[0] * size / dt / 1e6, 1)}


def _bench_main(argv: list[str]) -> None:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", action="store_true", required=True)
    ap.add_argument("--subs", type=int, default=20)
    ap.add_argument("--msgs", type=int, default=20)
    ap.add_argument("--size", type=int, default=1_000_000)
    a = ap.parse_args(argv)
    print(f"{a.subs} subscribers, {a.msgs} x {a.size}-byte QoS 1 publishes, clients in this process")
    with EmbeddedBroker() as b:
        print("embedded (amqtt, thread):", bench_fanout(b.url, a.subs, a.msgs, a.size))
    with tempfile.TemporaryDirectory() as d, bm.start_mosquitto(d, allow_anonymous=True) as m:
        print("mosquitto:", bench_fanout(m.url, a.subs, a.msgs, a.size))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _bench_main(sys.argv[1:])


def test_a_device_says_online_again_after_the_broker_published_its_will(any_broker, clients):
    """The link drops (RST): the broker publishes the device's will, "offline"; the transport
    reconnects by itself and re-publishes its announcements, so the operator does not go on
    counting a live device as gone."""
    from edge_agent.transport import Mqtt

    watcher = clients(any_broker, "watcher")
    watcher.subscribe("bfl/v1/devices/+/status", qos=1)
    dev = Mqtt(any_broker, client_id="d08", will=("bfl/v1/devices/d08/status", b"offline"))
    dev.reannounce = [("bfl/v1/devices/d08/status", b"online")]
    dev.connect()
    try:
        dev.publish("bfl/v1/devices/d08/status", b"online", retain=True)
        assert watcher.get().payload == b"online"
        sock = dev.client.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)  # the network thread sees the link gone and reconnects
        assert watcher.get(timeout=30).payload == b"offline"
        assert watcher.get(timeout=30).payload == b"online"
        assert dev.connects == 2
    finally:
        dev.close()
