"""Plugins are objects made per host by a module's create(host); stopped in reverse order."""

from __future__ import annotations

import sys
import types

import pytest

from coordinator.services import Services
from swarm.errors import ConfigError
from swarm.plugins import create_plugins, stop_plugins


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def test_one_plugin_object_per_host() -> None:
    class P:
        def __init__(self, host) -> None:
            self.host = host

    mod = _module("fake_plugin_c", create=P)
    a, b = create_plugins([mod], "host-a"), create_plugins([mod], "host-b")
    assert a[0].host == "host-a" and b[0].host == "host-b" and a[0] is not b[0]


def test_module_without_factory_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="fake_plugin_d has no create"):
        create_plugins([_module("fake_plugin_d", start=lambda app: None)], object())


def test_stop_runs_in_reverse_and_survives_a_failure() -> None:
    stopped = []

    class P:
        def __init__(self, name: str, fail: bool = False) -> None:
            self.name, self.fail = name, fail

        def stop(self) -> None:
            stopped.append(self.name)
            if self.fail:
                raise RuntimeError("boom")

    started = [P("a"), P("b", fail=True), P("c")]
    stop_plugins(started)
    assert stopped == ["c", "b", "a"] and started == []


def test_services_are_typed_slots_provided_once() -> None:
    services = Services()
    assert services.jobs is None and services.inference is None
    jobs = object()
    services.provide_jobs(jobs)  # type: ignore[arg-type]
    assert services.jobs is jobs
    with pytest.raises(ConfigError):
        services.provide_jobs(object())  # type: ignore[arg-type]


def test_listed_plugins_expose_factories() -> None:
    from coordinator.plugins import PLUGINS as COORDINATOR_PLUGINS
    from coordinator.plugins import load_plugins as load_coordinator_plugins
    from node.plugins import PLUGINS as NODE_PLUGINS
    from node.plugins import load_plugins as load_node_plugins

    for mod in load_coordinator_plugins(COORDINATOR_PLUGINS) + load_node_plugins(NODE_PLUGINS):
        assert callable(mod.__dict__.get("create")), mod.__name__
    assert "fake_plugin_c" not in sys.modules
