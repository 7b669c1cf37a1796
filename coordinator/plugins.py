"""The coordinator's plugins, in ONE place.

Each module may expose any of (all optional; ``app`` is the :class:`coordinator.app.CoordinatorApp`):

- ``install_grpc(server, app)``: add servicers to the coordinator's gRPC server (before start);
- ``install_http(web_app, app)``: add aiohttp routes to the HTTP app (before it starts);
- ``start(app)``: start background work, after both servers are serving;
- ``stop(app)``: stop it (called in reverse order, before the servers stop).

A listed module that does not exist yet is skipped with a debug log; an ImportError raised
*inside* an existing plugin is not hidden.
"""

from __future__ import annotations

from types import ModuleType

from swarm import plugins as _mechanics

PLUGINS: tuple[str, ...] = ("coordinator.web", "coordinator.jobs", "coordinator.inference")


def load_plugins(names: tuple[str, ...] = PLUGINS) -> list[ModuleType]:
    return _mechanics.load_plugins(names)
