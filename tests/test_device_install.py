"""The edge-device install path: systemd unit, environment file, validator-only install.

The validator-only install is real: deploy/device/install.sh builds a fresh venv without
torch, and that venv's `bfl-agent` validates and mines in a live experiment over Mosquitto.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.protocol.crypto import KeyPair
from edge_agent.protocol.messages import from_json

ROOT = Path(__file__).resolve().parent.parent
DEVICE = ROOT / "deploy" / "device"
BIN = Path(sys.executable).parent


def agent_envvars() -> set[str]:
    from typer.main import get_command

    from edge_agent.cli import app

    run = get_command(app).commands["run"]
    out = set()
    for p in run.params:
        env = getattr(p, "envvar", None)
        out |= {env} if isinstance(env, str) else set(env or ())
    return out


def test_env_file_sets_only_real_agent_options():
    text = (DEVICE / "bfl-agent.env").read_text()
    named = set(re.findall(r"^#?(BFL_[A-Z_]+)=", text, re.M))
    assert named and named <= agent_envvars(), sorted(named - agent_envvars())
    active = set(re.findall(r"^(BFL_[A-Z_]+)=", text, re.M))
    assert {"BFL_DEVICE_ID", "BFL_BROKER", "BFL_OPERATOR_KEY", "BFL_KEY", "BFL_CREATE_KEY", "BFL_WORKDIR"} <= active


def test_systemd_unit_verifies(tmp_path):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is missing (Debian package systemd)")
    unit = (DEVICE / "bfl-agent.service").read_text()
    assert "ExecStart=/opt/bfl/venv/bin/bfl-agent run" in unit and "EnvironmentFile=/etc/bfl/bfl-agent.env" in unit
    # verify checks that ExecStart exists: point it at this venv's agent
    local = tmp_path / "bfl-agent.service"
    local.write_text(unit.replace("/opt/bfl/venv/bin/bfl-agent", str(BIN / "bfl-agent")))
    out = subprocess.run([exe, "verify", str(local)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_install_script_rejects_bad_options():
    out = subprocess.run(["bash", str(DEVICE / "install.sh"), "--bogus"], capture_output=True, text=True)
    assert out.returncode != 0 and out.stderr.strip() == "error: unknown option --bogus (see --help)"


def start_agent(exe: Path, dev: str, broker: str, op_pub: str, tmp: Path, caps: str | None = None) -> subprocess.Popen:
    env = {
        **os.environ,
        "BFL_DEVICE_ID": dev,
        "BFL_KEY": str(tmp / dev / "device.key"),
        "BFL_CREATE_KEY": "1",
        "BFL_BROKER": broker,
        "BFL_OPERATOR_KEY": op_pub,
        "BFL_WORKDIR": str(tmp / dev),
        "BFL_METRICS_PORT": "0",
        "OMP_NUM_THREADS": "1",
    }
    if caps:
        env["BFL_CAPS"] = caps
    (tmp / dev).mkdir(parents=True, exist_ok=True)
    log = open(tmp / dev / "agent.log", "wb")
    return subprocess.Popen([str(exe), "run", "--exit-after-run"], env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.timeout(900)
def test_validator_only_install_has_no_torch_and_validates_in_a_live_run(tmp_path, mosquitto_broker):
    root = tmp_path / "root"
    t0 = time.monotonic()
    out = subprocess.run(
        ["bash", str(DEVICE / "install.sh"), "--validator-only", "--root", str(root), "--python", sys.executable],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    install_s = time.monotonic() - t0
    venv = root / "opt" / "bfl" / "venv"
    py = venv / "bin" / "python"
    probe = subprocess.run(
        [str(py), "-c", "import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in "
         "('torch', 'torchvision', 'onnxruntime', 'nacl', 'paho', 'prometheus_client')}))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(probe.stdout) == {
        "torch": False, "torchvision": False, "onnxruntime": True, "nacl": True, "paho": True, "prometheus_client": True
    }  # fmt: skip
    env_text = (root / "etc" / "bfl" / "bfl-agent.env").read_text()
    assert re.search(r"^BFL_CAPS=validate,mine$", env_text, re.M)
    assert (root / "etc" / "systemd" / "system" / "bfl-agent.service").is_file()

    # a live run: four full agents from the project venv and the slim one
    op = KeyPair.generate()
    op.save(tmp_path / "operator.key")
    agents = [start_agent(BIN / "bfl-agent", f"full{i}", mosquitto_broker, op.public_hex, tmp_path / "agents") for i in range(4)]
    agents.append(start_agent(venv / "bin" / "bfl-agent", "slim", mosquitto_broker, op.public_hex, tmp_path / "agents", "validate,mine"))
    try:
        run = subprocess.run(
            [
                str(BIN / "bfl"), "run", "--external", "--broker", mosquitto_broker, "--devices", "5",
                "--roles", "2,2,1", "--rounds", "2", "--model", "mlp", "--dataset", "fashion-mnist",
                "--samples-per-device", "300", "--local-epochs", "1", "--deadlines", "120,60,60", "--quiet",
                "--operator-key", str(tmp_path / "operator.key"), "--out", str(tmp_path / "run"),
                "--metrics-port", "0", "--join-timeout", "120",
            ],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "agents" / "slim" / "agent.log").read_text()[-3000:]
        for p in agents:
            p.wait(60)
    finally:
        for p in agents:
            if p.poll() is None:
                p.kill()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["rounds"]) == 2
    assert len(set(summary["heads"].values())) == 1 and summary["heads"]["slim"]
    # the slim device never trained but took part: its votes or its block are on the chain
    from edge_agent.store import ChainStore

    chain = ChainStore(tmp_path / "agents" / "slim" / "runs", summary["run_id"]).load_blocks()
    assert [b.id for b in chain][-1] == summary["heads"]["slim"]
    assert all("slim" not in [from_json(w).sender for w in b.body["wtxs"]] for b in chain)
    took_part = [b for b in chain if b.sender == "slim" or any(from_json(v).sender == "slim" for v in b.body["vtxs"])]
    assert took_part, "the validator-only device neither voted nor mined"
    print(f"validator-only install: {install_s:.0f} s")


def test_sigterm_stops_the_agent_cleanly_and_it_says_offline(tmp_path, mosquitto_broker):
    """systemd, podman and Kubernetes stop an agent with SIGTERM (as PID 1 in a container,
    Python would otherwise ignore it): it must leave at once and announce 'offline'."""
    import signal

    import paho.mqtt.client as mqtt

    from edge_agent.protocol.messages import decode, device_topic
    from edge_agent.transport import parse_broker_url

    op = KeyPair.generate()
    p = start_agent(BIN / "bfl-agent", "pi-07", mosquitto_broker, op.public_hex, tmp_path, "validate,mine")
    host, port, _ = parse_broker_url(mosquitto_broker)
    seen: list[str] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.on_message = lambda cl, ud, msg: seen.append(decode(msg.payload).body["state"]) if msg.payload else None
    c.on_connect = lambda cl, ud, fl, rc, pr: cl.subscribe(device_topic("pi-07", "status"), 1)
    c.connect(host, port)
    c.loop_start()
    try:
        end = time.monotonic() + 60
        while "online" not in seen and time.monotonic() < end:
            time.sleep(0.2)
        assert "online" in seen, (tmp_path / "pi-07" / "agent.log").read_text()
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0
        end = time.monotonic() + 10
        while seen[-1] != "offline" and time.monotonic() < end:
            time.sleep(0.1)
        assert seen[-1] == "offline"
    finally:
        c.loop_stop()
        if p.poll() is None:
            p.kill()


def test_poisoners_are_drawn_among_devices_that_can_train():
    from orchestrator.experiment import ExperimentError, RunConfig, choose_malicious

    devices = [f"v{i}" for i in range(6)] + ["t0", "t1"]
    for seed in range(20):
        cfg = RunConfig(devices=8, malicious=2, seed=seed)
        assert choose_malicious(cfg, devices, ["t0", "t1"]) == ["t0", "t1"]
    # the voting attack needs no training
    picks = {tuple(choose_malicious(RunConfig(malicious=1, seed=s, attack="invert_votes"), devices, ["t0", "t1"])) for s in range(20)}
    assert any(p[0].startswith("v") for p in picks)
    with pytest.raises(ExperimentError, match="only 2 devices can train"):
        choose_malicious(RunConfig(malicious=3), devices, ["t0", "t1"])
