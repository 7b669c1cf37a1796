"""Protobuf <-> domain objects for the control plane. Validation happens in the domain
constructors (:class:`~swarm.hardware.HardwareInfo` etc.), which raise
:class:`~swarm.errors.InvalidRequestError` on bad values from the network."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from swarm.errors import InvalidRequestError
from swarm.hardware import HardwareInfo, reported_mem_bandwidth
from swarm.membership import Link, NodeInfo
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.proto.v1 import inference_pb2 as ipb

if TYPE_CHECKING:  # swarm.inference imports torch; the CLI's client must not
    from swarm.inference.params import SamplingParams

MAX_METRICS_JSON_BYTES = 64 << 10


def hardware_to_proto(hw: HardwareInfo) -> pb.Hardware:
    return pb.Hardware(
        device_kind=hw.device_kind,
        device_name=hw.device_name,
        memory_bytes=hw.memory_bytes,
        memory_free_bytes=hw.memory_free_bytes,
        compute_capability=hw.compute_capability,
        cpu_cores=hw.cpu_cores,
        ram_bytes=hw.ram_bytes,
        disk_free_bytes=hw.disk_free_bytes,
        tflops=hw.tflops,
        tflops_dtype=hw.tflops_dtype,
        device=hw.device,
        mem_bandwidth_Bps=hw.mem_bandwidth_Bps,
    )


def hardware_from_proto(msg: pb.Hardware) -> HardwareInfo:
    """Raises InvalidRequestError when a field is missing or out of range."""
    try:
        return HardwareInfo(
            device=msg.device or msg.device_kind,
            device_kind=msg.device_kind,
            device_name=msg.device_name,
            memory_bytes=int(msg.memory_bytes),
            memory_free_bytes=int(msg.memory_free_bytes),
            compute_capability=msg.compute_capability,
            cpu_cores=int(msg.cpu_cores),
            ram_bytes=int(msg.ram_bytes),
            disk_free_bytes=int(msg.disk_free_bytes),
            tflops=float(msg.tflops),
            tflops_dtype=msg.tflops_dtype,
            # 0 (absent: an older node) or under the floor (a starved probe) = unmeasured
            mem_bandwidth_Bps=reported_mem_bandwidth(float(msg.mem_bandwidth_Bps)),
        )
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"invalid hardware in request: {exc}") from exc


def metrics_to_json(metrics: dict[str, Any]) -> str:
    text = json.dumps(metrics, separators=(",", ":"), default=str, allow_nan=False)
    if len(text.encode()) > MAX_METRICS_JSON_BYTES:
        raise InvalidRequestError(f"metrics are {len(text)} bytes of JSON, more than {MAX_METRICS_JSON_BYTES}; send fewer metrics")
    return text


def metrics_from_json(text: str) -> dict[str, Any]:
    """Parse a metrics JSON object from the network (size-limited, no NaN)."""
    if not text:
        return {}
    if len(text.encode()) > MAX_METRICS_JSON_BYTES:
        raise InvalidRequestError(f"metrics_json is larger than {MAX_METRICS_JSON_BYTES} bytes; send fewer metrics")

    def no_constants(name: str) -> float:
        raise InvalidRequestError(f"metrics_json contains {name}; send finite numbers or null")

    try:
        value = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequestError(f"metrics_json is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidRequestError("metrics_json must be a JSON object")
    return value


def node_to_proto(node: NodeInfo) -> pb.NodeRecord:
    return pb.NodeRecord(
        node_id=node.id,
        name=node.name,
        state=node.state,
        hardware=hardware_to_proto(node.hardware),
        peer_address=node.peer_address,
        registered_at_s=node.registered_at_s,
        last_seen_at_s=node.last_seen_at_s,
        metrics_json=json.dumps(node.metrics, separators=(",", ":"), default=str),
        status=node.status,
        measured_tflops=node.measured_tflops or 0.0,
        quarantine_reason=node.quarantine_reason,
        slow_reason=node.slow_reason,
        reachability=node.reachability,
        observed_address=node.observed_address,
        relay_node_id=node.relay_node_id,
        seen_mem_bandwidth_Bps=node.seen_mem_bandwidth_Bps or 0.0,
    )


def node_from_proto(msg: pb.NodeRecord) -> NodeInfo:
    try:
        return NodeInfo(
            id=msg.node_id,
            name=msg.name,
            state=msg.state,  # type: ignore[arg-type]
            hardware=hardware_from_proto(msg.hardware),
            peer_address=msg.peer_address,
            registered_at_s=msg.registered_at_s,
            last_seen_at_s=msg.last_seen_at_s,
            status=msg.status,
            metrics=metrics_from_json(msg.metrics_json),
            measured_tflops=msg.measured_tflops if msg.measured_tflops > 0 else None,
            seen_mem_bandwidth_Bps=(msg.seen_mem_bandwidth_Bps if math.isfinite(msg.seen_mem_bandwidth_Bps)
                                    and msg.seen_mem_bandwidth_Bps > 0 else None),
            quarantine_reason=msg.quarantine_reason,
            slow_reason=msg.slow_reason[:1000],
            reachability=msg.reachability or "direct",  # older coordinators: every node was dialled directly
            observed_address=msg.observed_address,
            relay_node_id=msg.relay_node_id,
        )
    except ValueError as exc:
        raise InvalidRequestError(f"coordinator sent an invalid node record: {exc}") from exc


def _finite(v: float) -> float:
    return v if math.isfinite(v) else 0.0


def link_to_proto(link: Link) -> pb.LinkRecord:
    return pb.LinkRecord(
        src=link.src,
        dst=link.dst,
        delay_s=_finite(link.delay_s),
        rtt_s=_finite(link.rtt_s),
        bandwidth_Bps=_finite(link.bandwidth_Bps),
        measured_at_s=link.measured_at_s,
        source=link.source,
        confirmed=link.confirmed,
        disputed=link.disputed,
    )


def link_from_proto(msg: pb.LinkRecord) -> Link:
    try:
        return Link(
            src=msg.src,
            dst=msg.dst,
            delay_s=msg.delay_s,
            rtt_s=msg.rtt_s,
            bandwidth_Bps=msg.bandwidth_Bps,
            measured_at_s=msg.measured_at_s,
            source=msg.source or "probe",
            confirmed=msg.confirmed,
            disputed=msg.disputed,
        )
    except ValueError as exc:
        raise InvalidRequestError(f"coordinator sent an invalid link record: {exc}") from exc


def sampling_to_pb(p: SamplingParams) -> ipb.ServeSamplingSpec:
    return ipb.ServeSamplingSpec(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed)
