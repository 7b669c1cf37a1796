"""CI check of docker-compose.yml (no Docker engine runs here).

Always: the YAML parses, has a coordinator and 3 nodes built from the repo's Dockerfile, and
every service's command line is accepted by our own CLI parsers (so a renamed flag breaks CI).
Where Debian's ``docker-compose`` is installed, ``docker-compose config -q`` must pass too.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[3]
COMPOSE = REPO / "docker-compose.yml"


def _services():
    doc = yaml.safe_load(COMPOSE.read_text())
    return doc["services"]


def test_compose_has_coordinator_and_three_nodes_from_the_dockerfile():
    services = _services()
    assert set(services) == {"coordinator", "node1", "node2", "node3"}
    for svc in services.values():
        build = svc["build"]
        context = REPO / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
        assert (context / dockerfile).is_file()
    for name in ("node1", "node2", "node3"):
        assert services[name]["environment"]["SWARM_COORDINATOR"] == "coordinator:7070"
        assert "coordinator" in services[name]["depends_on"]


def test_compose_commands_parse_with_our_clis():
    from coordinator.cli import build_parser as coordinator_parser
    from node.cli import build_parser as node_parser

    parsers = {"swarm-coordinator": coordinator_parser(), "swarm-node": node_parser()}
    for name, svc in _services().items():
        program, *argv = svc["command"]
        args = parsers[program].parse_args(argv)
        assert args.command == ("serve" if program == "swarm-coordinator" else "join"), name
        assert args.state_dir == "/state"


def test_dockerfile_installs_the_package_and_console_scripts():
    text = (REPO / "Dockerfile").read_text()
    assert "pip install ." in text
    for path in ("swarm", "node", "coordinator", "pyproject.toml"):
        assert f"COPY {path}" in text or f"COPY pyproject.toml" in text


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_config_validates():
    out = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
