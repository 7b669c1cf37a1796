"""Domain objects of swarm membership: nodes and measured links (no protobuf here).

The coordinator's registry returns :class:`NodeInfo` snapshots; its network store returns
:class:`Link` records. ``swarm status --json`` and ``GET /api/nodes`` print
:func:`node_json` / :func:`link_json`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable
from typing import Any, Literal

from swarm.hardware import MAX_MEM_BYTES_PER_FLOP, HardwareInfo
from swarm.reachability import REACHABILITY, effective_reachability
from swarm.reachability import link_paths as _link_paths

NodeState = Literal["online", "lost", "left", "quarantined"]
NODE_STATES: tuple[str, ...] = ("online", "lost", "left", "quarantined")


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    """One node as the coordinator sees it. Times are unix seconds."""

    id: str
    name: str
    state: NodeState
    hardware: HardwareInfo
    peer_address: str
    registered_at_s: float
    last_seen_at_s: float
    status: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    # what the coordinator measured (coordinator/verification.py); None = not measured yet
    measured_tflops: float | None = None
    # memory bandwidth its decode steps showed (bytes/s, a lower bound: coordinator/inference/memwatch.py)
    seen_mem_bandwidth_Bps: float | None = None
    quarantine_reason: str = ""  # set when state is "quarantined": why
    slow_reason: str = ""  # its neighbours see it below half its planned speed (coordinator/jobs/speed.py)
    # how peers reach it (swarm/reachability.py): "pending" until the coordinator dialled it back
    reachability: str = "direct"
    advertised_address: str = ""  # what the node advertised ("" = peer_address)
    observed_address: str = ""  # its address as the coordinator sees its calls (its NAT's, if any)
    relay_node_id: str = ""  # relayed: "coordinator" or the volunteer relay's id
    relay_address: str = ""  # a node offering relaying (--relay): host:port of its relay port

    def __post_init__(self) -> None:
        if self.state not in NODE_STATES:
            raise ValueError(f"state must be one of {NODE_STATES}, got {self.state!r}")
        if not self.id:
            raise ValueError("node id must not be empty")
        if self.reachability not in REACHABILITY:
            raise ValueError(f"reachability must be one of {REACHABILITY}, got {self.reachability!r}")

    @property
    def is_online(self) -> bool:
        return self.state == "online"

    @property
    def planning_tflops(self) -> float:
        """The speed planners (and the plan preview) use: see :func:`effective_tflops`."""
        return effective_tflops(self.hardware.tflops, self.measured_tflops)

    @property
    def planning_mem_bandwidth_Bps(self) -> float | None:
        """The memory bandwidth placement uses: see :func:`effective_mem_bandwidth`."""
        hw = self.hardware
        return effective_mem_bandwidth(hw.mem_bandwidth_Bps, claimed_tflops=hw.tflops,
                                       planning_tflops=self.planning_tflops, seen_Bps=self.seen_mem_bandwidth_Bps)


CLAIM_SLACK = 2.0  # a claim up to 2x the measurement stands (the challenge under-measures a little)
# A memory-bandwidth claim up to 4x what the node's decode steps showed stands. The steps show a
# LOWER bound (bytes a step must read / its compute time): the time also holds what is not memory
# traffic (kernel launches, Python per layer, sampling, attention's scattered KV reads), and the
# probe times the device's best case (one long streaming copy). A 4x margin leaves an honest node
# room for a decode step that reaches a quarter of its streaming figure; a claim beyond is believed
# no further than the steps show. (On tiny models the fixed costs dominate and every node's claim
# is replaced: placement then uses what decode steps really take there, which is what it predicts.)
MEM_BANDWIDTH_SEEN_SLACK = 4.0


def effective_tflops(claimed: float, measured: float | None) -> float:
    """The claim, unless it exceeds CLAIM_SLACK x what the coordinator measured; then the
    measurement. Pure: the one rule for the planner and the plan preview."""
    if measured is None or measured <= 0:
        return claimed
    return measured if claimed > CLAIM_SLACK * measured else claimed


def effective_mem_bandwidth(claimed_Bps: float, *, claimed_tflops: float, planning_tflops: float,
                            seen_Bps: float | None = None) -> float | None:
    """A node's memory bandwidth as placement believes it: None when unmeasured (0); else the
    claim, scaled down by as much as its TFLOPS claim was (:func:`effective_tflops`), and at most
    MAX_MEM_BYTES_PER_FLOP bytes per FLOP/s of ``planning_tflops`` (no device has more): the
    coordinator times no memory-bound challenge, so the claim is believed no further than the
    compute it measured allows (docs/security.md, memory bandwidth). Then, when its decode steps
    were seen (``seen_Bps``, bytes/s) and the figure so far is more than MEM_BANDWIDTH_SEEN_SLACK x
    that, the seen figure replaces it (as :func:`effective_tflops` replaces a TFLOPS claim). Pure."""
    if not claimed_Bps > 0:
        return None
    bw = claimed_Bps
    if claimed_tflops > 0 and 0 < planning_tflops < claimed_tflops:
        bw = claimed_Bps * planning_tflops / claimed_tflops
    if planning_tflops > 0:
        bw = min(bw, MAX_MEM_BYTES_PER_FLOP * planning_tflops * 1e12)
    if seen_Bps is not None and seen_Bps > 0 and bw > MEM_BANDWIDTH_SEEN_SLACK * seen_Bps:
        bw = seen_Bps
    return bw


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    """A measured directed link src -> dst."""

    src: str
    dst: str
    delay_s: float
    rtt_s: float
    bandwidth_Bps: float
    measured_at_s: float
    source: str = "probe"
    confirmed: bool = False  # both ends of the probe agreed (coordinator/network.py probe_agreement)
    disputed: bool = False  # the two ends disagreed; the lower value is kept

    def __post_init__(self) -> None:
        if self.src == self.dst:
            raise ValueError("a link joins two different nodes")
        for name in ("delay_s", "rtt_s", "bandwidth_Bps"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")


def link_paths(nodes: Iterable[NodeInfo]) -> Callable[[str, str], str]:
    """``path(src, dst)`` for :func:`link_json` from the nodes' reachability and punched peers."""
    return _link_paths([(n.id, n.reachability, n.metrics) for n in nodes])


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def node_json(node: NodeInfo, now_s: float) -> dict[str, Any]:
    """The JSON form of a node (status --json, /api/nodes)."""
    hw = node.hardware
    return {
        "id": node.id,
        "name": node.name,
        "state": node.state,
        "device": hw.device,
        "device_kind": hw.device_kind,
        "device_name": hw.device_name,
        "memory_bytes": hw.memory_bytes,
        "memory_free_bytes": hw.memory_free_bytes,
        "compute_capability": hw.compute_capability,
        "tflops": hw.tflops,
        "measured_tflops": node.measured_tflops,
        "quarantine_reason": node.quarantine_reason,
        "slow_reason": node.slow_reason,
        "tflops_dtype": hw.tflops_dtype,
        "mem_bandwidth_Bps": hw.mem_bandwidth_Bps or None,  # None: not measured (an older node)
        # what its decode steps showed (a lower bound), None: none seen; the planner's figure:
        "mem_bandwidth_seen_Bps": node.seen_mem_bandwidth_Bps,
        "mem_bandwidth_planning_Bps": node.planning_mem_bandwidth_Bps,
        "cpu_cores": hw.cpu_cores,
        "ram_bytes": hw.ram_bytes,
        "disk_free_bytes": hw.disk_free_bytes,
        "last_seen_s": round(max(0.0, now_s - node.last_seen_at_s), 3),
        "last_seen_at": node.last_seen_at_s,
        "registered_at": node.registered_at_s,
        "peer_address": node.peer_address,
        "reachability": effective_reachability(node.reachability, node.metrics),
        "observed_address": node.observed_address,
        "relay": node.relay_node_id or None,
        "status": node.status,
        "metrics": node.metrics,
        # peer traffic since the node process started (node/traffic.py); None from older nodes
        "bytes_sent": _byte_count(node.metrics.get("bytes_sent")),
        "bytes_received": _byte_count(node.metrics.get("bytes_received")),
    }


def _byte_count(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def link_json(link: Link, path: Callable[[str, str], str] | None = None) -> dict[str, Any]:
    """``confirmed`` / ``disputed`` (both ends of a probe agreed / disagreed) appear only when true.
    ``path`` ("direct" | "punched" | "relayed"): ``path(src, dst)``, from :func:`link_paths`."""
    flags = {k: True for k in ("confirmed", "disputed") if getattr(link, k)}
    return flags | {
        "path": path(link.src, link.dst) if path is not None else "direct",
        "src": link.src,
        "dst": link.dst,
        "bandwidth_Bps": _finite_or_none(link.bandwidth_Bps),
        "delay_s": _finite_or_none(link.delay_s),
        "rtt_s": _finite_or_none(link.rtt_s),
        "measured_at": link.measured_at_s,
        "source": link.source,
    }
