"""The README's "Using a swarm" commands, as a user would paste them, against a local swarm.

Every ```bash block of that section is parsed (backslash continuations joined, comments
dropped, `;` splitting commands); each `swarm ...` command runs as a subprocess with
SWARM_COORDINATOR / SWARM_TOKEN (the admin token, as an operator sets it) set (as the README
says it finds the coordinator), after the placeholders in :data:`PLACEHOLDERS` are replaced by
real tiny files and READ_TOKEN by the read token; `curl` lines are sent with urllib (with their
``-H`` headers). Every command must exit 0. A word in capitals the mapping does not know fails the test:
the README cannot grow a command this test does not run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.procs import child_env, coordinator_proc, nodes_proc, wait_until

pytestmark = pytest.mark.multiproc

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Using a swarm"


def readme_commands(text: str) -> list[str]:
    """The shell commands of the ```bash blocks in the README's "Using a swarm" section."""
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    out = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            cmd: list[str] = []
            for w in words + [";"]:
                if w == ";" or w.endswith(";") and not w.startswith(("'", '"')):
                    if w != ";":
                        cmd.append(w[:-1])
                    if cmd:
                        out.append(shlex.join(cmd))
                    cmd = []
                else:
                    cmd.append(w)
    return out


def _cluster_file(path: Path) -> Path:
    """A 4-GPU cluster in the scenario format of shared/bench/scheduler/scenarios/ (2 fast pairs)."""
    n = 4
    delay = [[0.0 if i == j else (0.001 if i // 2 == j // 2 else 0.01) for j in range(n)] for i in range(n)]
    bw = [[1e12 if i == j else (1.25e10 if i // 2 == j // 2 else 1.25e8) for j in range(n)] for i in range(n)]
    path.write_text(json.dumps({
        "name": "readme", "num_devices": n, "d_dp": 2, "d_pp": 2, "delay_s": delay, "bandwidth_Bps": bw,
        "model": {"num_layers": 4, "hidden_size": 256, "seq_len": 128, "num_params": 4e6, "global_batch_seqs": 8,
                  "micro_batch_seqs": 2},
    }))
    return path


@pytest.mark.timeout(180)
def test_readme_commands_run_against_a_local_swarm(tmp_path):
    from swarm.model.testing import make_tiny_checkpoint
    from tests.multiproc.training._common import TEXT

    commands = readme_commands(README.read_text())
    assert any(c.startswith("swarm train") for c in commands) and any(c.startswith("curl") for c in commands)
    make_tiny_checkpoint(tmp_path / "model", num_layers=3, hidden_size=32, num_heads=4, max_position_embeddings=128)
    (tmp_path / "corpus.txt").write_text(TEXT * 12)  # ~18 windows of 65 tokens: 3 epochs of batch 8 = 6 steps
    placeholders = {
        "CLUSTER.json": str(_cluster_file(tmp_path / "cluster.json")),
        "CHECKPOINT_DIR": str(tmp_path / "model"),
        "corpus.txt": str(tmp_path / "corpus.txt"),
        "trained/": str(tmp_path / "trained"),
        "ckpt/": str(tmp_path / "ckpt"),
    }
    with coordinator_proc(tmp_path / "coord") as coord, nodes_proc(coord, [tmp_path / f"n{i}" for i in range(3)]):
        wait_until(lambda: sum(n.state == "online" for n in coord.snapshot().nodes) == 3, 30, message="3 nodes online")
        env = {**child_env(), "SWARM_COORDINATOR": coord.address, "SWARM_TOKEN": coord.admin_token}
        placeholders["COORDINATOR:HTTP_PORT"] = f"{coord.host}:{coord.http_port}"
        job_id = None
        for command in commands:
            words = shlex.split(command)
            if job_id is not None:
                placeholders["ID"] = job_id
            words = [placeholders.get(w, w) for w in words]
            words = [w.replace("COORDINATOR:HTTP_PORT", placeholders["COORDINATOR:HTTP_PORT"]) for w in words]
            words = [w.replace("READ_TOKEN", coord.read_token) for w in words]
            unknown = [w for w in words if re.fullmatch(r"[A-Z][A-Z_:]+(\.json)?/?", w)]
            assert not unknown, f"README command {command!r} has placeholders the test does not map: {unknown}"
            if words[0] == "curl":
                url = next(w for w in words if w.startswith("http"))
                body = words[words.index("-d") + 1].encode()
                headers = dict(w.split(": ", 1) for i, w in enumerate(words) if i and words[i - 1] == "-H")
                req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **headers})
                with urllib.request.urlopen(req, timeout=60) as resp:
                    assert resp.status == 200 and json.loads(resp.read())["choices"], command
                continue
            assert words[0] == "swarm", f"README command {command!r}: only swarm and curl commands are run"
            proc = subprocess.run([sys.executable, "-m", "swarm.cli", *words[1:]], capture_output=True, text=True,
                                  env=env, timeout=120, cwd=README.parent)  # as a user runs them: from the checkout
            assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            m = re.search(r"job ([0-9a-f]{12}) submitted", proc.stdout)
            if m:
                job_id = m.group(1)
        assert job_id is not None, "the README's swarm train printed no job id"
        assert (tmp_path / "trained" / "config.json").is_file() and (tmp_path / "ckpt" / "config.json").is_file()


def test_readme_command_parser_joins_lines_and_splits_on_semicolons():
    text = f"{SECTION}\n```bash\nswarm a --x 1 \\\n    --y 2   # note\nswarm jobs; swarm job ID --json\n```\n## Next\n"
    assert readme_commands(text) == ["swarm a --x 1 --y 2", "swarm jobs", "swarm job ID --json"]
    assert os.path.isfile(README)
