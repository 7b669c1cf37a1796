"""The planner prices a codec's two directions: activations forward, gradients backward."""

from __future__ import annotations

import json

import numpy as np
import pytest

from swarm.cli import main as swarm_main
from swarm.scheduling import JobShape
from swarm.scheduling.costs import partition_cost, pipeline_matrix, pp_matrix

from tests.unit.scheduling.conftest import SCENARIO_DIR

CASE1 = SCENARIO_DIR / "case1_datacenter_on_demand.json"


def test_pipeline_matrix_is_forward_plus_backward_and_dtfm_when_equal():
    rng = np.random.default_rng(0)
    delay, bw = rng.uniform(0.001, 0.05, (6, 6)), rng.uniform(1e8, 1e9, (6, 6))
    assert np.array_equal(pipeline_matrix(delay, bw, 3e8, 3e8), pp_matrix(delay, bw, 3e8))
    w = pipeline_matrix(delay, bw, 4e8, 1e8)
    assert np.allclose(2 * w, pp_matrix(delay, bw, 4e8) + pp_matrix(delay, bw, 1e8))
    groups = [[0, 1], [2, 3], [4, 5]]
    zero = np.zeros((6, 6))
    full = partition_cost(zero, pipeline_matrix(delay, bw, 4e8, 4e8), groups).total
    half_back = partition_cost(zero, w, groups).total
    assert half_back < full  # cheaper gradients make the pipeline term cheaper


def test_backward_bytes_follow_act_grad_bytes_or_default_to_forward():
    job = JobShape(num_layers=4, hidden_size=8, seq_len=4, num_params=1e3, global_batch_seqs=4, act_bytes_per_value=2.0)
    assert job.c_pp_backward(2) == job.c_pp(2) == 2 * 4 * 8 * 2.0
    job = JobShape(num_layers=4, hidden_size=8, seq_len=4, num_params=1e3, global_batch_seqs=4, act_bytes_per_value=0.5,
                   act_grad_bytes_per_value=1.0, c_pp_bytes=100.0)
    assert job.c_pp(2) == 100.0 and job.c_pp_backward(2) == 200.0
    assert JobShape.from_json(job.to_json()) == job


def _plan(capsys, *extra):
    rc = swarm_main(["plan", "--cluster", str(CASE1), "--time-budget-s", "0.5", "--json", *extra])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.timeout(120)
def test_cli_plan_prices_the_codec_both_ways(capsys):
    none = _plan(capsys)
    again = _plan(capsys, "--compression", "none")
    assert (again["cost_s"], again["stages"]) == (none["cost_s"], none["stages"])  # default: the file's job as is
    aq = _plan(capsys, "--compression", "aqsgd:fw=2,bw=4")
    fw0, bw0 = none["boundary_bytes_per_step"]["forward"], none["boundary_bytes_per_step"]["backward"]
    fw1, bw1 = aq["boundary_bytes_per_step"]["forward"], aq["boundary_bytes_per_step"]["backward"]
    assert fw0 == bw0 == 488.28125 * 2048 * 2048 * 2  # the file's fp16 activations, all replicas
    assert fw0 / fw1 >= 6 and bw0 / bw1 >= 3
    assert aq["compression"] == "aqsgd:fw=2,bw=4" and aq["pp_s"] < none["pp_s"]
    assert aq["breakdown"]["c_pp_backward_bytes"] > aq["breakdown"]["c_pp_bytes"]  # 4-bit gradients, 2-bit changes
    rc = swarm_main(["plan", "--cluster", str(CASE1), "--compression", "zip:9"])
    assert rc == 2 and "--compression" in capsys.readouterr().err
