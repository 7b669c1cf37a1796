"""The README's demo command end to end: a local swarm that trains and generates."""

import re
import subprocess
import sys

import pytest

from swarm.model.checkpoint import load_checkpoint


@pytest.mark.timeout(240)
def test_local_demo_trains_and_generates(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "swarm.cli", "local", "demo", "--state-dir", str(tmp_path), "--train-steps", "20"],
        capture_output=True, text=True, timeout=220,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"demo failed:\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    # the status table with three online nodes
    assert len(re.findall(r"\bonline\b", out)) >= 3
    # training: loss printed falling, checkpoint written
    m = re.search(r"loss ([0-9.]+) -> ([0-9.]+) over (\d+) steps", out)
    assert m, out
    assert float(m.group(2)) < float(m.group(1))
    ckpt = load_checkpoint(tmp_path / "demo-checkpoint")  # our own loader reads the export
    assert ckpt.config.num_layers == 3
    # generation: a 3-stage chain streamed tokens
    assert "chain:" in out and out.count("layers") >= 3
    g = re.search(r"(\d+) tokens, first after", out)
    assert g and int(g.group(1)) > 0, out
    assert "all processes stopped" in out
