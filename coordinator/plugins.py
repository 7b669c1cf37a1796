"""The coordinator's plugins, in ONE place: which modules, what they get, what they give.

Each listed module exposes one factory, ``create(host: CoordinatorHost) -> CoordinatorPlugin``.
The coordinator calls it once per coordinator when it starts, then on the returned object:

- ``install_grpc(server)``: add servicers to the coordinator's gRPC server (before it starts);
- ``install_http(web_app)``: add aiohttp routes to the HTTP app (before it starts);
- ``start()``: start background work, after both servers are serving;
- ``stop()``: stop it (called in reverse order, before the servers stop).

Subclass :class:`CoordinatorPlugin` and override only the hooks you need. Keep per-coordinator
state on the plugin object (never in module-level dicts). What the plugin may use of the
coordinator is :class:`CoordinatorHost`; services of other plugins are read through
``host.services`` (:mod:`coordinator.services`).

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

from coordinator.services import Services

if TYPE_CHECKING:
    import grpc
    from aiohttp import web

    from coordinator.network import NetworkStore
    from coordinator.registry import NodeRegistry
    from coordinator.store import Database

PLUGINS: tuple[str, ...] = ("coordinator.web", "coordinator.jobs", "coordinator.inference")


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorHost:
    """What a coordinator plugin gets from the coordinator.

    - ``clock``: time for everything the plugin decides (tests pass a FakeClock);
    - ``state_dir``: the coordinator's state directory; keep files under a subdirectory named
      after the plugin;
    - ``db``: ``db.connect()`` opens a new SQLite connection to the coordinator's file; create
      your own tables with ``CREATE TABLE IF NOT EXISTS``;
    - ``registry``: ``snapshot()`` / ``online()`` -> frozen :class:`swarm.membership.NodeInfo`;
    - ``network``: ``matrix(node_ids)`` -> ``(delay_s, bandwidth_Bps, measured_at)`` arrays,
      ``record(Link(...))`` for links observed from real transfers;
    - ``authenticate_node(context) -> node_id`` and ``authenticate_user(context, action)``: who is
      calling a servicer method (``authenticate_user`` allows the admin token only); both raise
      AuthError (use inside a method decorated with ``swarm.transport.errors.grpc_errors``);
    - ``authorize_read(context) -> Access``: a user's read RPC (the read or admin token:
      ``Access.FULL``; nothing with ``--public-status``: ``Access.PUBLIC``, to be answered without
      peer addresses and job assignments); raises AuthError / PermissionDeniedError. HTTP routes
      are checked before their handler runs (coordinator/http.py); handlers ask
      ``coordinator.http.access_of(request)``;
    - ``services``: the typed services of other plugins (``services.jobs``, ``services.inference``);
    - ``max_model_params``: the largest config-only model a job may ask the coordinator to
      initialise (``swarm-coordinator serve --max-model-params``).
    - ``referee_flops_per_s``: CPU FLOP/s per served model the inference referee may spend on
      check windows (``--referee-gflops``; 0: no referee).
    - ``security`` (swarm.transport.tls): pass it to ``data_channel(address, security=...,
      node_id=...)`` to call a node's peer service as the coordinator (``swarm://coordinator``).
    """

    clock: Clock
    state_dir: Path
    db: Database
    registry: NodeRegistry
    network: NetworkStore
    authenticate_node: Callable[[grpc.ServicerContext], str]
    authenticate_user: Callable[[grpc.ServicerContext, str], None]
    authorize_read: Callable[[grpc.ServicerContext], Any]
    services: Services
    max_model_params: int = 2_000_000_000
    rebalance: bool = True  # --no-rebalance: a node seen slow is reported (slow_node), never re-balanced
    helpers: bool = True  # --no-helpers: idle nodes never join a running job as helpers of its slowest stage
    security: Any = None
    referee_flops_per_s: float = 20e9  # --referee-gflops: the inference referee's CPU budget per model

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if not all(callable(f) for f in (self.authenticate_node, self.authenticate_user, self.authorize_read)):
            raise TypeError("authenticate_node, authenticate_user and authorize_read must be callables")


class CoordinatorPlugin:
    """What a coordinator plugin gives the coordinator. Every hook is optional (a no-op here)."""

    def install_grpc(self, server: grpc.Server) -> None:
        """Add servicers to the coordinator's gRPC server; called before it starts."""

    def install_http(self, web_app: web.Application) -> None:
        """Add routes to the coordinator's aiohttp app; called before it starts."""

    def start(self) -> None:
        """Start background work; called once both servers are serving."""

    def stop(self) -> None:
        """Stop background work and release resources; called in reverse order before the servers stop."""


def load_plugins(names: tuple[str, ...] = PLUGINS) -> list[ModuleType]:
    return _mechanics.load_plugins(names)


def create_plugins(modules: list[ModuleType], host: CoordinatorHost) -> list[CoordinatorPlugin]:
    """One plugin object per module, from its ``create(host)`` factory (ConfigError without one)."""
    return _mechanics.create_plugins(modules, host)
