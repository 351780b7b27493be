"""Shared pytest fixtures: MQTT brokers, the container images. (Other fixtures live in the
test files that use them.)"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from broker import BrokerError, EmbeddedBroker
from broker.mosquitto import find_mosquitto, start_mosquitto


# Every run in the suite derives its keys (orchestrator/identity.py) from this fixed host
# secret, in the environment its subprocesses inherit: a test's roles, votes and blocks are
# the same on every machine, so a test cannot pass here and fail on another by the draw.
_BFL_HOME = Path(tempfile.mkdtemp(prefix="bfl-home-"))
(_BFL_HOME / "host-secret").write_text(hashlib.sha256(b"posbfl test suite").hexdigest() + "\n")
os.environ["BFL_HOME"] = str(_BFL_HOME)


@pytest.fixture
def embedded_broker():
    """URL of a fresh embedded amqtt broker (MQTT 3.1.1, no size limit) on a free port."""
    with EmbeddedBroker() as b:
        yield b.url


@pytest.fixture
def mosquitto_broker(tmp_path_factory):
    """URL of a real mosquitto on a free port (anonymous, max packet size 64 MiB); fails if mosquitto is not installed."""
    try:
        find_mosquitto()
    except BrokerError as exc:  # a missing dependency is a failure, not a skip
        pytest.fail(str(exc))
    with start_mosquitto(tmp_path_factory.mktemp("mosquitto"), max_packet_mb=64, allow_anonymous=True) as m:
        yield m.url


@pytest.fixture(params=["embedded", "mosquitto"])
def any_broker(request):
    """URL of each broker in turn."""
    return request.getfixturevalue(f"{request.param}_broker")


ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "scripts" / "container" / "build.sh"
sys.path.insert(0, str(ROOT / "scripts"))
from k8s_play import podman_env  # noqa: E402


@pytest.fixture(scope="session")
def project_images() -> dict[str, str]:
    """The images (full, validator, broker) as scripts/container/build.sh --local builds them,
    built once per session. Unchanged sources rebuild from podman's layer cache in seconds, so
    the images always match the working tree; --prune drops earlier builds' images (a CI
    machine kept between runs would otherwise fill its disk)."""
    m = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert m, "no version in pyproject.toml"
    t0 = time.monotonic()
    proc = subprocess.run([str(BUILD), "--local", "--prune"], capture_output=True, text=True, timeout=3000, env=podman_env())
    build_s = time.monotonic() - t0
    assert proc.returncode == 0, f"build failed after {build_s:.0f}s:\n{proc.stdout[-4000:]}{proc.stderr[-6000:]}"
    print(f"\nbuild: {build_s:.0f}s\n" + "\n".join(line for line in proc.stderr.splitlines() if line.startswith("==>")))
    print(proc.stdout)
    image = f"posbfl-testbed:{m.group(1)}"
    return {"full": image, "validator": f"{image}-validator", "broker": f"{image}-broker"}
