"""Shared objects for tests of the control plane: a test HardwareInfo and signed registrations."""

from __future__ import annotations

import os
from contextlib import contextmanager

import swarm
from swarm import certs
from swarm.clock import SystemClock
from swarm.hardware import HardwareInfo
from swarm.identity import Identity
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.transport.convert import hardware_to_proto

HW = HardwareInfo(device="cpu", device_kind="cpu", device_name="test cpu", memory_bytes=8 << 30,
                  memory_free_bytes=4 << 30, cpu_cores=2, ram_bytes=8 << 30, disk_free_bytes=1 << 40,
                  tflops=0.25, tflops_dtype="float32")
def default_address(ident: Identity) -> str:
    """A peer address of its own for each test identity (the coordinator refuses one held by another node)."""
    return f"127.0.0.1:{10_000 + int(ident.node_id[:4], 16) % 50_000}"


def make_register(app, ident: Identity, *, token=None, version=None, name="node-a", address=None,
                  timestamp=None, hardware=None, nonce=None) -> pb.RegisterRequest:
    address = default_address(ident) if address is None else address
    payload = pb.RegistrationPayload(
        protocol_version=swarm.PROTOCOL_VERSION if version is None else version, node_id=ident.node_id, name=name,
        peer_address=address, hardware=hardware or hardware_to_proto(HW),
        timestamp_s=SystemClock().time() if timestamp is None else timestamp,
        nonce=os.urandom(16) if nonce is None else nonce, tls_public_key=certs.public_key_der(certs.new_key()),
    ).SerializeToString()
    return pb.RegisterRequest(payload=payload, public_key=ident.public_key, signature=ident.sign(payload),
                              token=app.join_token if token is None else token)


@contextmanager
def inprocess_coordinator(state_dir, *, plugins: tuple[str, ...] = (), **overrides):
    """A real CoordinatorApp on 127.0.0.1 free ports with short test intervals; stopped on exit.

        with inprocess_coordinator(tmp_path / "coord", plugins=("coordinator.jobs",)) as app:
            stub = MyStub(tests.helpers.tls.app_channel(app))   # TLS, trusting the app's CA
    """
    from coordinator.app import CoordinatorApp, CoordinatorConfig
    from coordinator.network import MeasurementPolicy

    settings = dict(heartbeat_interval_s=0.2, node_timeout_s=1.5, sweep_interval_s=0.1,
                    measurement=MeasurementPolicy(probe_bytes=256 << 10, num_pings=3))
    settings.update(overrides)
    app = CoordinatorApp(CoordinatorConfig(state_dir=state_dir, plugins=plugins, **settings))
    app.start()
    try:
        yield app
    finally:
        app.stop(grace_s=0.2)


@contextmanager
def inprocess_node(app, state_dir, *, name: str = "n0", plugins: tuple[str, ...] = (), hardware=None,
                   register_timeout_s: float = 10.0):
    """A real NodeAgent joined to ``app`` (hardware injected, no probe), registered on entry; leaves on exit."""
    from node.agent import NodeAgent, NodeConfig

    config = NodeConfig(coordinator_address=f"127.0.0.1:{app.grpc_port}", token=app.join_token, state_dir=state_dir,
                        name=name, host="127.0.0.1", plugins=plugins)
    agent = NodeAgent(config, hardware=hardware or HW)
    agent.start()
    try:
        if not agent.wait_registered(register_timeout_s):
            raise TimeoutError(f"node {name} did not register within {register_timeout_s} s")
        yield agent
    finally:
        agent.stop()
