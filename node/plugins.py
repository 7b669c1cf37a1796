"""The node's plugins, in ONE place: which modules, what they get, what they give.

Each listed module exposes one factory, ``create(host: NodeHost) -> NodePlugin``. The agent
calls it once per agent when it starts, then on the returned object:

- ``install(server)``: add servicers to the node's peer gRPC server (before it starts);
- ``start()``: start background work once the peer server is serving (the node may not be
  registered yet: use ``host.wait_registered(timeout_s)`` before calling the coordinator);
- ``stop()``: stop it (reverse order, before the node leaves and its server stops).

Subclass :class:`NodePlugin` and override only the hooks you need. Keep per-agent state on the
plugin object (never in module-level dicts). What the plugin may use of the node is
:class:`NodeHost`.

A listed module that does not exist yet is skipped with a debug log; an ImportError raised
*inside* an existing plugin is not hidden.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from swarm import plugins as _mechanics
from swarm.clock import Clock
from swarm.faults import NO_FAULTS, FaultConfig
from swarm.identity import is_node_id

from node.traffic import Traffic

if TYPE_CHECKING:
    import grpc

PLUGINS: tuple[str, ...] = ("node.training", "node.inference")


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeHost:
    """What a node plugin gets from the node agent.

    - ``node_id``: this node's id (hex of its public key); ``device``: torch device string;
      ``state_dir``: the node's state directory (keep files under a subdirectory); ``clock``;
    - ``coordinator_channel``: a grpc.Channel to the coordinator, for plugin stubs;
      ``call_metadata()``: metadata tying a call to this node's registered identity (raises
      UnavailableError while not registered); ``wait_registered(timeout_s) -> bool``;
    - ``update_metrics(**values)``: JSON-able values sent with every heartbeat and shown in
      ``/api/nodes`` under ``metrics``;
    - ``faults`` (:class:`swarm.faults.FaultConfig`): injected misbehaviour, tests only;
    - ``traffic`` (:class:`node.traffic.Traffic`): add the bytes exchanged with peers and observe
      large pushes; totals go out as the ``bytes_sent`` / ``bytes_received`` metrics and
      observations as link measurements with every heartbeat;
    - ``listen_host`` / ``step_wire_port``: where plugins' own ports listen (the inference step
      wire, swarm/transport/step_wire.py; -1: none);
    - ``sign(data)``: a signature by this node's identity key (Ed25519), which the coordinator
      verifies with the public key the node registered (swarm/inference/kv_receipt.py);
    - ``security`` (swarm.transport.tls): ``data_channel(address, security=host.security,
      node_id=...)`` dials a peer with this node's certificate; ``security.peer_identity(context)``
      is the caller of a servicer method (node id or ``"coordinator"``, from its certificate).
    """

    node_id: str
    device: str
    state_dir: Path
    clock: Clock
    coordinator_channel: grpc.Channel
    call_metadata: Callable[[], tuple[tuple[str, str], ...]]
    wait_registered: Callable[[float], bool]
    update_metrics: Callable[..., None]
    traffic: Traffic
    security: Any = None
    faults: FaultConfig = NO_FAULTS  # SWARM_FAULT (tests only): what this node does wrong on purpose
    listen_host: str = "0.0.0.0"  # where the peer server listens (--host); extra ports listen there too
    step_wire_port: int = 0  # --step-wire-port: 0 picks a free port, -1: no step wire
    sign: Callable[[bytes], bytes] | None = None  # signs with the node's identity key (KV hand-off receipts)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if not is_node_id(self.node_id):
            raise ValueError(f"malformed node id {self.node_id!r}")
        for name in ("call_metadata", "wait_registered", "update_metrics"):
            if not callable(getattr(self, name)):
                raise TypeError(f"NodeHost.{name} must be callable")


class NodePlugin:
    """What a node plugin gives the agent. Every hook is optional (a no-op here)."""

    def install(self, server: grpc.Server) -> None:
        """Add servicers to the node's peer gRPC server; called before it starts."""

    def start(self) -> None:
        """Start background work; called once the peer server is serving."""

    def stop(self) -> None:
        """Stop background work and release resources; called in reverse order before the node leaves."""


def load_plugins(names: tuple[str, ...] = PLUGINS) -> list[ModuleType]:
    return _mechanics.load_plugins(names)


def create_plugins(modules: list[ModuleType], host: NodeHost) -> list[NodePlugin]:
    """One plugin object per module, from its ``create(host)`` factory (ConfigError without one)."""
    return _mechanics.create_plugins(modules, host)
