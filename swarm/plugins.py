"""Loading, creating and stopping plugins; shared by the coordinator and the node.

A plugin is a module that exposes one factory, ``create(host) -> plugin``: the host (the
coordinator or the node) hands it a typed context object and gets back an object with the
hooks that host calls (:class:`coordinator.plugins.CoordinatorPlugin`,
:class:`node.plugins.NodePlugin`). All per-host state lives in that object, so two hosts in one
process (tests do this) never share plugin state. Which modules are plugins is said by
``coordinator/plugins.py`` and ``node/plugins.py``; this module only does the mechanics for both.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Protocol

from swarm.errors import ConfigError

log = logging.getLogger(__name__)


class Stoppable(Protocol):
    def stop(self) -> None: ...


def load_plugins(names: tuple[str, ...]) -> list[ModuleType]:
    """Import each named module. A listed module that does not exist is skipped with a debug
    log; an ImportError raised *inside* an existing plugin is not hidden."""
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            log.debug("plugin %s is not installed; skipping", name)
    return modules


def create_plugins(modules: Sequence[ModuleType], host: Any) -> list[Any]:
    """``module.create(host)`` for each module, in order. Raises ConfigError for a module
    without a ``create`` factory (it was listed as a plugin but is not one)."""
    plugins = []
    for mod in modules:
        factory = mod.__dict__.get("create")
        if not callable(factory):
            raise ConfigError(f"plugin module {mod.__name__} has no create(host) factory; "
                              "remove it from the plugin list or add the factory")
        plugins.append(factory(host))
    return plugins


def stop_plugins(started: list[Stoppable]) -> None:
    """Call ``stop()`` on the started plugins in reverse order, then forget them. A plugin that
    fails to stop is logged and the rest are stopped anyway."""
    for plugin in reversed(started):
        try:
            plugin.stop()
        except Exception:  # noqa: BLE001 -- stop the rest anyway
            log.exception("plugin %s failed to stop", type(plugin).__module__)
    started.clear()
