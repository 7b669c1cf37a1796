"""The node's plugins, in ONE place.

Each module may expose any of (all optional; ``agent`` is the :class:`node.agent.NodeAgent`):

- ``install(server, agent)``: add servicers to the node's peer gRPC server (before it starts);
- ``start(agent)``: start background work once the peer server is serving (the node may not
  be registered yet: use ``agent.wait_registered(timeout_s)`` before calling the coordinator);
- ``stop(agent)``: stop it (reverse order, before the node leaves and its server stops).

A listed module that does not exist yet is skipped with a debug log; an ImportError raised
*inside* an existing plugin is not hidden.
"""

from __future__ import annotations

from types import ModuleType

from swarm import plugins as _mechanics

PLUGINS: tuple[str, ...] = ("node.training", "node.inference")


def load_plugins(names: tuple[str, ...] = PLUGINS) -> list[ModuleType]:
    return _mechanics.load_plugins(names)
