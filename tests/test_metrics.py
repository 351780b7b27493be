"""Agent metrics agree with the chain; drop reasons are all declared; bad ports fail cleanly."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import urllib.request

from edge_agent.metrics import AgentMetrics, MetricsError, free_ports, serve, stop_serving, topic_kind
from edge_agent.protocol import node as nd
from edge_agent.protocol.messages import DROP_REASONS, from_json

from simnet import SimNet

ROOT = Path(__file__).resolve().parent.parent


class MeteredNet(SimNet):
    """The in-memory network with an AgentMetrics per device, fed as the agent shell feeds it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.metrics = {d: AgentMetrics(d, ["train", "validate", "mine"]) for d in self.nodes}
        for d, m in self.metrics.items():
            m.joined(self.genesis.run)

    def _do(self, dev, actions):
        m = self.metrics[dev]
        m.attack_set({"name": "gaussian"} if dev in self.malicious else None)
        for a in actions:
            m.action(a, self.now)
        super()._do(dev, actions)

    def deliver(self, dev, event):
        if isinstance(event, nd.GlobalEvaluated):
            self.metrics[dev].global_accuracy(event.acc_bp)
        super().deliver(dev, event)


def value(m: AgentMetrics, name: str, **labels) -> float:
    v = m.registry.get_sample_value(name, {"device": m.device, **labels})
    return 0.0 if v is None else v


def test_metrics_follow_the_chain_in_a_simulated_run():
    net = MeteredNet(n=8, roles=(4, 2, 2), rounds=4, malicious=("d03",))
    net.start()
    net.run()
    run = net.genesis.run
    chain = net.committed["d00"]
    assert len(chain) == 4
    for dev, m in net.metrics.items():
        node = net.nodes[dev]
        # stake on the chain == the rewards counted by role
        rewards = sum(value(m, "bfl_rewards_total", role=r) for r in ("worker", "validator", "miner"))
        assert value(m, "bfl_stake", run=run) == node.state.stake(dev) == rewards
        assert value(m, "bfl_chain_height", run=run) == 4
        assert value(m, "bfl_blocks_appended_total") == 4
        assert value(m, "bfl_blocks_won_total") == sum(1 for b in chain if b.sender == dev)
        assert value(m, "bfl_attack_info", run=run, attack="gaussian" if dev == "d03" else "none") == 1
        # the votes this validator cast are the ones in the chain's vote transactions
        pos = neg = 0
        for blk in chain:
            for raw in blk.body["vtxs"]:
                vtx = from_json(raw)
                if vtx.sender == dev:
                    pos += sum(1 for v in vtx.body["votes"] if v["positive"])
                    neg += sum(1 for v in vtx.body["votes"] if not v["positive"])
        assert (value(m, "bfl_votes_total", outcome="positive"), value(m, "bfl_votes_total", outcome="negative")) == (pos, neg)
        acc = sum(1 for b in chain if dev in b.body["accepted"])
        rej = sum(1 for b in chain if dev in b.body["rejected"])
        assert value(m, "bfl_worker_updates_total", outcome="accepted") == acc
        assert value(m, "bfl_worker_updates_total", outcome="rejected") == rej
        assert value(m, "bfl_phase_duration_seconds_count", phase="round") == 4
        assert 0 < value(m, "bfl_global_accuracy_ratio", run=run) <= 1
        # finished: every role gauge says idle
        assert value(m, "bfl_role", run=run, role="idle") == 1
        assert sum(value(m, "bfl_role", run=run, role=r) for r in ("worker", "validator", "miner")) == 0
    # the malicious worker was voted down, so validators counted negative votes
    assert sum(value(m, "bfl_votes_total", outcome="negative") for m in net.metrics.values()) > 0
    assert value(net.metrics["d03"], "bfl_worker_updates_total", outcome="rejected") >= 1


def test_drops_follow_both_counters_and_never_go_down():
    m = AgentMetrics("d00", ["validate"])
    m.joined("r1")
    m.drops({"bad_signature": 2, "duplicate": 1}, source="node")
    m.drops({"wrong_run": 4})  # the shell's own counter
    m.drops({"bad_signature": 3, "duplicate": 1}, source="node")
    assert value(m, "bfl_messages_dropped_total", reason="bad_signature") == 3
    m.joined("r2")  # a new Node counts from 0 again: its drops add up, never go down
    m.drops({"bad_signature": 1}, source="node")
    m.drops({"wrong_run": 4})
    assert value(m, "bfl_messages_dropped_total", reason="bad_signature") == 4
    assert value(m, "bfl_messages_dropped_total", reason="duplicate") == 1
    assert value(m, "bfl_messages_dropped_total", reason="wrong_run") == 4
    # every declared reason exists from the start (dashboards see zeros, not gaps)
    assert m.registry.get_sample_value("bfl_messages_dropped_total", {"device": "d00", "reason": "too_large"}) == 0


def test_every_drop_reason_in_the_code_is_declared():
    used = set()
    for path in list((ROOT / "edge_agent").rglob("*.py")) + list((ROOT / "orchestrator").rglob("*.py")):
        text = path.read_text()
        used |= set(re.findall(r'Drop\("([a-z_]+)"', text))
        used |= set(re.findall(r'drops\["([a-z_]+)"\]', text))
    assert used and used <= set(DROP_REASONS), sorted(used - set(DROP_REASONS))


def test_topic_kinds_are_bounded():
    assert topic_kind("bfl/v1/r1/wtx/d01") == "wtx"
    assert topic_kind("bfl/v1/r1/blob/d01/" + "a" * 64) == "blob"
    assert topic_kind("bfl/v1/devices/d01/hello") == "hello"
    assert topic_kind("bfl/v1/r1/genesis") == "genesis"
    assert topic_kind("bfl/v1/r1/whatever/d01") == "other"
    assert topic_kind("some/other/topic") == "other"


def test_server_serves_the_registry_and_a_taken_port_is_a_clear_error():
    m = AgentMetrics("d07", ["train"])
    port = free_ports(19500, 1)[0]
    server = serve(m.registry, "127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'bfl_agent_info{caps="train",device="d07"' in text
        assert "_created" not in text
        with pytest.raises(MetricsError, match=f"127.0.0.1:{port}"):
            serve(m.registry, "127.0.0.1", port)
    finally:
        stop_serving(server)


def test_cli_reports_a_taken_metrics_port_in_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        key = tmp_path / "dev.key"
        out = subprocess.run(
            [
                sys.executable, "-m", "edge_agent.cli", "run", "--id", "d01", "--key", str(key), "--create-key",
                "--operator-key", "00" * 32, "--broker", "mqtt://127.0.0.1:1", "--workdir", str(tmp_path / "w"),
                "--metrics-port", str(port), "--metrics-addr", "127.0.0.1",
            ],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 2
    assert key.is_file()  # --create-key made the device key on first start
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: cannot serve metrics on 127.0.0.1:{port}")
    assert "Traceback" not in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", "--metrics-port", "70000"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_bad_metrics_address_and_targets_folder_are_one_line_errors(tmp_path):
    with pytest.raises(MetricsError, match="cannot bind metrics to 256.1.1.1:9400"):
        free_ports(9400, 1, "256.1.1.1")
    blocker = tmp_path / "file"
    blocker.write_text("")
    common = [
        sys.executable, "-m", "orchestrator.cli", "run", "--devices", "4", "--roles", "2,1,1", "--rounds", "1",
        "--model", "mlp", "--dataset", "fashion-mnist", "--join-timeout", "5",
    ]  # fmt: skip
    for i, (extra, message) in enumerate((
        (["--metrics-addr", "256.1.1.1"], "error: cannot bind metrics to 256.1.1.1:"),
        (["--metrics-port", str(free_ports(19600, 1)[0]), "--metrics-targets", str(blocker / "sub")], "error: --metrics-targets"),
    )):
        out = subprocess.run(common + ["--out", str(tmp_path / f"run{i}")] + extra, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "Traceback" not in out.stderr and out.stderr.strip().splitlines()[-1].startswith(message), out.stderr
