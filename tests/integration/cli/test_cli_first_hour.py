"""A newcomer's first commands: fast (no torch on paths that only talk to the coordinator), quiet
when piped into `head`, errors on stderr only, and the README's examples point at real files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: connection refused at once

# Runs `swarm ARGS` in-process and reports on stderr whether torch/transformers got imported.
_PROBE = (
    "import sys, swarm.cli\n"
    "try:\n"
    "    rc = swarm.cli.main(sys.argv[1:])\n"
    "finally:\n"
    "    heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
    "    print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SWARM_COORDINATOR", None)
    # a well-formed token (CA fingerprint, no secret): commands get as far as connecting
    env["SWARM_TOKEN"] = "swarm1." + "ab" * 32
    return env


def _swarm(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=60, **kwargs)


@pytest.mark.parametrize("argv", [
    ["models"], ["generate", "--model", "m", "--prompt", "hi"], ["unserve", "--model", "m"],
    ["serve", "--model", "."], ["status"], ["jobs"], ["job", "J"],
])
def test_commands_that_only_talk_to_the_coordinator_do_not_import_torch(argv):
    res = _swarm(*argv, "--coordinator", UNREACHABLE)
    assert res.returncode != 0, res
    assert "HEAVY=\n" in res.stderr or res.stderr.rstrip().endswith("HEAVY="), res.stderr


def test_generate_error_goes_to_stderr_without_a_blank_line_first():
    res = _swarm("generate", "--model", "nope", "--prompt", "hi", "--coordinator", UNREACHABLE)
    assert res.returncode == 1
    assert res.stdout == ""  # nothing before the first token, and no token came
    assert res.stderr.startswith("error: "), repr(res.stderr)
    assert "unreachable" in res.stderr


def test_output_into_a_closed_pipe_exits_quietly():
    # `swarm plan ... | head -0`: the reader is gone before the first line; deterministic because
    # the read end is closed before the child starts.
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "swarm.cli", "plan", "--cluster", "examples/cluster-datacenter-spot.json",
             "--time-budget-s", "0.2"],
            cwd=REPO, env=_env(), stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(w)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 0


def test_broken_pipe_is_handled_once_in_main(monkeypatch):
    import argparse

    import swarm.cli

    def func(args):
        raise BrokenPipeError(32, "Broken pipe")

    class Parser(argparse.ArgumentParser):
        def parse_args(self, argv=None, namespace=None):
            return argparse.Namespace(func=func, log_level="WARNING")

    silenced = []
    monkeypatch.setattr(swarm.cli, "build_parser", lambda: Parser())
    monkeypatch.setattr(swarm.cli, "_silence_stdout", lambda: silenced.append(True))  # keep pytest's stdout
    assert swarm.cli.main([]) == 0
    assert silenced == [True]


def test_readme_plan_example_names_a_file_in_the_repository():
    readme = (REPO / "README.md").read_text()
    paths = re.findall(r"swarm plan --cluster (\S+)", readme)
    assert paths, "the README shows `swarm plan --cluster FILE`"
    for p in paths:
        assert (REPO / p).is_file(), f"README names {p}, which is not in the repository"


def test_plan_runs_on_the_shipped_example_cluster():
    res = subprocess.run([sys.executable, "-m", "swarm.cli", "plan", "--cluster",
                          "examples/cluster-datacenter-spot.json", "--time-budget-s", "0.2"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "64 devices" in res.stdout


def test_local_demo_help_says_what_the_demo_does():
    env = {**_env(), "COLUMNS": "400"}  # argparse wraps at hyphens otherwise ("fine-" / "tuning")
    res = subprocess.run([sys.executable, "-m", "swarm.cli", "local", "--help"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for word in ("status", "AQ-SGD", "fine-tuning", "generation"):
        assert word in text, (word, text)
