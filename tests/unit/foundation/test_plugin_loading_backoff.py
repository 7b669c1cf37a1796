"""Plugin loading skips only missing plugin modules; backoff grows and resets."""

import sys

import pytest

from coordinator.plugins import load_plugins as load_coordinator_plugins
from node.coordinator_link import Backoff
from node.plugins import load_plugins as load_node_plugins


def test_missing_plugins_are_skipped():
    assert load_coordinator_plugins(("coordinator.no_such_plugin_xyz",)) == []
    assert load_node_plugins(("node.no_such_plugin_xyz",)) == []


def test_import_error_inside_a_plugin_is_not_hidden(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_plugin_pkg_a"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import fake_dependency_that_is_missing_q\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="fake_dependency_that_is_missing_q"):
        load_node_plugins(("fake_plugin_pkg_a",))
    sys.modules.pop("fake_plugin_pkg_a", None)


def test_present_plugin_is_loaded(tmp_path, monkeypatch):
    (tmp_path / "fake_plugin_ok_b.py").write_text("def start(app):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mods = load_coordinator_plugins(("fake_plugin_ok_b", "coordinator.no_such_plugin_xyz"))
    assert [m.__name__ for m in mods] == ["fake_plugin_ok_b"]


def test_backoff_grows_to_max_and_resets():
    b = Backoff(initial_s=0.5, max_s=10.0, seed=1)
    delays = [b.next_delay_s() for _ in range(10)]
    assert delays[0] < 1.0 and max(delays) <= 10.0 and delays[-1] > 5.0
    b.reset()
    assert b.next_delay_s() < 1.0
    assert Backoff(seed=1).next_delay_s() == Backoff(seed=1).next_delay_s()


def test_default_node_name_is_accepted_by_the_coordinator(monkeypatch):
    import socket

    from coordinator.servicer import NAME_RE
    from node.agent import default_name

    for host in ("my host (laptop)", "gpu-01.example.org", "___", "ü" * 80):
        monkeypatch.setattr(socket, "gethostname", lambda h=host: h)
        name = default_name("ab" * 16)
        assert NAME_RE.match(name), name
