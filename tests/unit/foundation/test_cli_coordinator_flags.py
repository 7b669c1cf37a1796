"""Every `swarm` command that talks to a coordinator takes --coordinator/--token the same way:
flag, else SWARM_COORDINATOR / SWARM_TOKEN, else 127.0.0.1:7070 and no token."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from swarm.cli import build_parser
from swarm.cli.common import DEFAULT_COORDINATOR, resolve_coordinator, target_from_args

# Commands that only start processes or work offline: no coordinator to name.
OFFLINE = {"local", "plan"}
# Commands that print state (a job, jobs, models, a placement, a generation) and so take --json.
PRINTS_STATE = {"status", "train", "jobs", "job", "cancel", "serve", "models", "generate"}
# Minimal positional/required arguments per command so parsing succeeds.
REQUIRED = {
    "train": ["--model", "m", "--data", "d"], "job": ["J"], "cancel": ["J"], "serve": ["--model", "m"],
    "unserve": ["--model", "m"], "generate": ["--model", "m", "--prompt", "p"],
}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


def test_resolution_order_is_flag_then_env_then_default():
    env = {"SWARM_COORDINATOR": "10.0.0.1:7000", "SWARM_TOKEN": "env-token"}
    assert resolve_coordinator("h:1", "flag-token", env) == resolve_coordinator("h:1", "flag-token", {})
    t = resolve_coordinator("h:1", "flag-token", env)
    assert (t.address, t.token) == ("h:1", "flag-token")
    t = resolve_coordinator(None, None, env)
    assert (t.address, t.token) == ("10.0.0.1:7000", "env-token")
    t = resolve_coordinator(None, None, {})
    assert (t.address, t.token) == (DEFAULT_COORDINATOR, None)
    assert DEFAULT_COORDINATOR == "127.0.0.1:7070"


def test_every_coordinator_command_has_the_shared_flags():
    commands = _subcommands()
    assert PRINTS_STATE | {"unserve"} <= set(commands)
    for name, p in commands.items():
        if name in OFFLINE:
            continue
        opts = _options(p)
        assert {"--coordinator", "--token"} <= opts, name
        if name in PRINTS_STATE:
            assert "--json" in opts, name


@pytest.mark.parametrize("name", sorted(PRINTS_STATE | {"unserve"}))
def test_every_command_resolves_the_same_way(name, monkeypatch):
    parser = build_parser()
    base = [name, *REQUIRED.get(name, [])]
    monkeypatch.delenv("SWARM_COORDINATOR", raising=False)
    monkeypatch.delenv("SWARM_TOKEN", raising=False)
    t = target_from_args(parser.parse_args(base))
    assert (t.address, t.token) == (DEFAULT_COORDINATOR, None)
    monkeypatch.setenv("SWARM_COORDINATOR", "10.1.1.1:7001")
    monkeypatch.setenv("SWARM_TOKEN", "tok-env")
    t = target_from_args(parser.parse_args(base))
    assert (t.address, t.token) == ("10.1.1.1:7001", "tok-env")
    t = target_from_args(parser.parse_args(base + ["--coordinator", "h:2", "--token", "tok-flag"]))
    assert (t.address, t.token) == ("h:2", "tok-flag")


def test_node_join_resolves_like_the_swarm_commands(monkeypatch):
    from node.cli import build_parser as node_parser

    monkeypatch.delenv("SWARM_COORDINATOR", raising=False)
    monkeypatch.setenv("SWARM_TOKEN", "join-tok")
    t = target_from_args(node_parser().parse_args(["join"]))
    assert (t.address, t.token) == (DEFAULT_COORDINATOR, "join-tok")


@pytest.mark.timeout(60)
def test_status_help_does_not_import_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "swarm.cli", "status", "--help"],
                         capture_output=True, text=True, timeout=50)
    assert out.returncode == 0
    assert "torch" not in out.stderr
