"""Small clusters for the scheduler tests (seeded, built in the test, no files needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from swarm.scheduling import Cluster, Device, JobShape

SCENARIO_DIR = Path("/work/shared/bench/scheduler/scenarios")
REFERENCE = Path("/work/shared/bench/scheduler/dtfm_reference.json")


def clustered(n: int, regions: int, seed: int, *, asymmetric: bool = False, noise: bool = True, tflops=None, memory=None) -> Cluster:
    """n devices in ``regions`` regions: fast inside a region, random slower links across."""
    rng = np.random.default_rng(seed)
    reg = rng.integers(0, regions, size=n)
    r_delay = rng.uniform(0.005, 0.1, size=(regions, regions))
    r_bw = rng.uniform(0.1e9, 1.5e9, size=(regions, regions))
    if not asymmetric:
        r_delay = np.minimum(r_delay, r_delay.T)
        r_bw = np.minimum(r_bw, r_bw.T)
    jitter = 0.1 if noise else 0.0  # without noise, devices of a region are interchangeable
    delay = r_delay[reg][:, reg] * rng.uniform(1 - jitter, 1 + jitter, size=(n, n))
    bw = r_bw[reg][:, reg] * rng.uniform(1 - jitter, 1 + jitter, size=(n, n))
    same = reg[:, None] == reg[None, :]
    delay = np.where(same, 0.001, delay)
    bw = np.where(same, 12.5e9, bw)
    if not asymmetric:
        delay = np.minimum(delay, delay.T)
        bw = np.minimum(bw, bw.T)
    devs = tuple(
        Device(
            id=f"d{i}",
            tflops=None if tflops is None else float(tflops[i]),
            memory_bytes=None if memory is None else int(memory[i]),
            region=f"r{reg[i]}",
        )
        for i in range(n)
    )
    return Cluster(devices=devs, delay_s=delay, bandwidth_Bps=bw)


def dtfm_job(dp: int, pp: int, layers: int = 8) -> JobShape:
    return JobShape(
        num_layers=layers,
        hidden_size=1024,
        seq_len=1024,
        num_params=3.5e8,
        global_batch_seqs=64,
        micro_batch_seqs=4,
        dp=dp,
        pp=pp,
        c_dp_bytes=2.0e8,
        c_pp_bytes=1.5e8,
    )


@pytest.fixture
def scenario_files() -> list[Path]:
    files = sorted(SCENARIO_DIR.glob("*.json"))
    if not files:
        pytest.skip("shared scenario files not present")
    return files
