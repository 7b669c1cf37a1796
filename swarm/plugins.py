"""Loading and stopping plugin modules; shared by the coordinator and the node.

Which modules are plugins, and which hooks they expose, is said by ``coordinator/plugins.py``
and ``node/plugins.py``; this module only does the mechanics for both.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

log = logging.getLogger(__name__)


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


def stop_plugins(started: list[ModuleType], owner: object) -> None:
    """Call ``stop(owner)`` on the started plugins in reverse order, then forget them. A plugin
    that fails to stop is logged and the rest are stopped anyway."""
    for mod in reversed(started):
        try:
            if hasattr(mod, "stop"):
                mod.stop(owner)
        except Exception:  # noqa: BLE001 -- stop the rest anyway
            log.exception("plugin %s failed to stop", mod.__name__)
    started.clear()
