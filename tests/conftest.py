"""Shared pytest fixtures: MQTT brokers. (Other fixtures live in the test files that use them.)"""

from __future__ import annotations

import pytest

from broker import BrokerError, EmbeddedBroker
from broker.mosquitto import find_mosquitto, start_mosquitto


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
