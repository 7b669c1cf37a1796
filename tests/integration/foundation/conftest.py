"""In-process coordinator fixtures: a real CoordinatorApp on 127.0.0.1:0 and real stubs."""

from __future__ import annotations

import pytest

from coordinator.app import CoordinatorApp, CoordinatorConfig
from coordinator.network import MeasurementPolicy
from swarm.proto.v1 import coordinator_pb2_grpc as pb_grpc
from tests.helpers.tls import app_channel


@pytest.fixture
def app(tmp_path):
    config = CoordinatorConfig(
        state_dir=tmp_path / "coord", heartbeat_interval_s=0.2, node_timeout_s=1.5, sweep_interval_s=0.1,
        plugins=(), measurement=MeasurementPolicy(probe_bytes=256 << 10, num_pings=3),
    )
    app = CoordinatorApp(config)
    app.start()
    yield app
    app.stop(grace_s=0.2)

@pytest.fixture
def stub(app):
    with app_channel(app) as channel:
        yield pb_grpc.CoordinatorStub(channel)
