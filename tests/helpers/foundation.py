"""Shared objects for tests of the control plane: a test HardwareInfo and signed registrations."""

from __future__ import annotations

import os

import swarm
from swarm.clock import SystemClock
from swarm.hardware import HardwareInfo
from swarm.identity import Identity
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.transport.convert import hardware_to_proto

HW = HardwareInfo(device="cpu", device_kind="cpu", device_name="test cpu", memory_bytes=8 << 30,
                  memory_free_bytes=4 << 30, cpu_cores=2, ram_bytes=8 << 30, disk_free_bytes=1 << 40,
                  tflops=0.25, tflops_dtype="float32")
def make_register(app, ident: Identity, *, token=None, version=None, name="node-a", address="127.0.0.1:9",
                  timestamp=None, hardware=None, nonce=None) -> pb.RegisterRequest:
    payload = pb.RegistrationPayload(
        protocol_version=swarm.PROTOCOL_VERSION if version is None else version, node_id=ident.node_id, name=name,
        peer_address=address, hardware=hardware or hardware_to_proto(HW),
        timestamp_s=SystemClock().time() if timestamp is None else timestamp,
        nonce=os.urandom(16) if nonce is None else nonce,
    ).SerializeToString()
    return pb.RegisterRequest(payload=payload, public_key=ident.public_key, signature=ident.sign(payload),
                              token=app.join_token if token is None else token)
