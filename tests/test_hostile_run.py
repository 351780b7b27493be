"""A real `bfl run` with an attacker on the broker who holds no device's key.

The attacker (a plain paho client) announces forged hellos and retained 'offline' statuses
for the run's devices before and during the run, and publishes the payloads that used to
stop the operator (tests/test_hostile_input.py VECTORS) on the run's report, head, block and
ack topics, and on the topics the agents read (genesis, cmd). The run must finish every
round with every device reporting, and summary.json must count what the operator dropped.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import time

import paho.mqtt.client as mqtt

from broker import parse_url
from edge_agent.protocol.crypto import KeyPair
from edge_agent.protocol.messages import Drop, decode, device_topic, sign, topic

from test_hostile_input import VECTORS, envelope_with

DEVICES = ["d00", "d01", "d02", "d03"]  # what `bfl run --devices 4` names its local agents
ROUNDS = 3
ATTACKS = ("200 KB of [", 'nested {"a": 100 000 deep', "5 000-digit integer", "invalid UTF-8", "lone surrogate")


class Attacker:
    def __init__(self, url: str):
        self.key = KeyPair.generate()  # its own key: it has no device's
        self.inbox: queue.Queue = queue.Queue()
        host, port = parse_url(url)
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="mallory", protocol=mqtt.MQTTv311)
        self.c.on_message = lambda _c, _u, m: self.inbox.put((m.topic, bytes(m.payload)))
        self.c.connect(host, port)
        self.c.loop_start()
        self.c.subscribe([("bfl/v1/+/genesis", 1), ("bfl/v1/+/head/+", 1)])
        self.published = 0

    def send(self, t: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(t, payload, qos=1, retain=retain).wait_for_publish(10)
        self.published += 1

    def forge_announcements(self) -> int:
        """A hello with its own key and a retained 'offline' for every device, self-signed."""
        for dev in DEVICES:
            hello = {"run": "devices", "kind": "hello", "round": 0, "sender": dev, "pubkey": self.key.public_hex,
                     "caps": ["train", "validate", "mine"], "time": int(time.time())}  # fmt: skip
            status = {"run": "devices", "kind": "status", "round": 0, "sender": dev, "state": "offline"}
            self.send(device_topic(dev, "hello"), sign(self.key, hello).payload(), retain=True)
            self.send(device_topic(dev, "status"), sign(self.key, status).payload(), retain=True)
        return 2 * len(DEVICES)

    def hostile_payloads(self, run: str) -> tuple[int, int]:
        """Each vector on each run topic the operator reads (and on the agents' genesis and
        cmd topics), a report with a junk field, a forged report. Returns how many the
        operator must drop as malformed and as bad signatures."""
        malformed = 0
        for i, name in enumerate(ATTACKS):
            dev = DEVICES[i % len(DEVICES)]
            for kind in ("report", "head", "block", "ack"):
                self.send(topic(run, kind, dev), VECTORS[name])
                malformed += 1
            self.send(topic(run, "genesis"), VECTORS[name])
            self.send(topic(run, "cmd", dev), VECTORS[name])
        self.send(topic(run, "report", "d01"), envelope_with("acc_bp", VECTORS["5 000-digit integer"], run=run))
        for acc in (-5, 9999):  # signed, but not by d02: the first is malformed before that shows
            body = {"run": run, "kind": "report", "round": 1, "sender": "d02", "head": "ab" * 32, "acc_bp": acc, "stake": 10**6}
            self.send(topic(run, "report", "d02"), sign(self.key, body).payload())
        return malformed + 2, 1

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_run_survives_an_attacker_without_keys(tmp_path, mosquitto_broker):
    t0 = time.monotonic()
    mallory = Attacker(mosquitto_broker)
    # (malformed, bad signatures) the operator must count for each burst of the attacker; the
    # first: forged announcements, retained, which the operator reads when it subscribes
    sent = [(0, mallory.forge_announcements())]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "--devices", "4", "--roles", "2,1,1",
           "--rounds", str(ROUNDS), "--model", "mlp", "--dataset", "fashion-mnist", "--samples-per-device", "200",
           "--test-per-device", "100", "--local-epochs", "1", "--partition", "iid", "--deadlines", "60,30,30",
           "--broker", mosquitto_broker, "--metrics-port", "0", "--quiet", "--out", str(out)]  # fmt: skip
    orch = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run, heights = None, set()
    try:
        # a burst when the genesis appears and after every new head: during each round
        while orch.poll() is None and time.monotonic() - t0 < 120:
            try:
                t, payload = mallory.inbox.get(timeout=0.2)
                body = decode(payload).body
            except (queue.Empty, Drop):  # nothing yet, or its own junk coming back
                continue
            if body["kind"] == "genesis" and run is None:
                run = body["run"]
            elif body["kind"] == "head" and body["run"] == run and body["height"] not in heights | {ROUNDS}:
                heights.add(body["height"])  # (not after the last round: the operator is done)
            else:
                continue
            forged = mallory.forge_announcements()
            bad, unsigned = mallory.hostile_payloads(run)
            sent.append((bad, forged + unsigned))
        stdout, _ = orch.communicate(timeout=60)
    finally:
        if orch.poll() is None:
            orch.kill()
        mallory.close()
    assert orch.returncode == 0, stdout[-3000:]
    assert len(sent) == ROUNDS + 1, "the attacker did not attack in every round"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_id"] == run and len(summary["rounds"]) == ROUNDS
    # nobody was taken for offline: every round waited for all four devices' reports
    assert all(r["devices_reporting"] == len(DEVICES) for r in summary["rounds"]), summary["rounds"]
    assert None not in summary["heads"].values() and len(set(summary["heads"].values())) == 1
    drops = summary["operator_drops"]
    assert set(drops) == {"malformed", "bad_signature"}, drops  # no internal_error, no genuine message
    # every burst was counted (the last one, sent during the last round, may come too late)
    for i, reason in enumerate(("malformed", "bad_signature")):
        assert sum(b[i] for b in sent[:-1]) <= drops[reason] <= sum(b[i] for b in sent), (drops, sent)
    # the agents read the vectors too (block, head, genesis, cmd topics): none hit a bug
    for dev in DEVICES:
        log = (out / "agents" / dev / "agent.log").read_text()
        assert "Traceback" not in log, log[-3000:]
    print(f"\nattacker: {mallory.published} messages, operator drops {drops}, {time.monotonic() - t0:.1f}s")
