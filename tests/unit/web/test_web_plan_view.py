"""The /api/plan preview: matrix filling, the predicted breakdown, planning and its cache."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from swarm.clock import FakeClock
from swarm.errors import ConfigError

from coordinator.web.plan_view import (
    ASSUMED_BANDWIDTH_BPS,
    ASSUMED_DELAY_S,
    OnlineNode,
    PlanPreview,
    PreviewConfig,
    compute_preview,
    fill_matrices,
    predicted_json,
)


def _nodes(n: int, *, memory_bytes: int = 16 << 30) -> list[OnlineNode]:
    return [OnlineNode(id=f"n{i}", name=f"node {i}", tflops=1.0 + i, memory_bytes=memory_bytes) for i in range(n)]


def _matrices(n: int) -> tuple[np.ndarray, np.ndarray]:
    delay = np.full((n, n), np.nan)
    bw = np.full((n, n), np.nan)
    np.fill_diagonal(delay, 0.0)
    np.fill_diagonal(bw, np.inf)
    if n > 1:
        delay[0, 1], bw[0, 1] = 0.001, 1e9
    return delay, bw


def test_fill_matrices_counts_and_fills_only_unmeasured_links() -> None:
    delay, bw = _matrices(3)
    bw[1, 2] = 0.0  # a broken measurement counts as unmeasured
    d, b, assumed = fill_matrices(delay, bw)
    assert assumed == 5
    assert d[0, 1] == 0.001 and b[0, 1] == 1e9
    assert d[1, 2] == ASSUMED_DELAY_S and b[1, 2] == ASSUMED_BANDWIDTH_BPS
    assert np.all(np.isfinite(d)) and np.all(b > 0) and np.all(np.isfinite(b))
    assert math.isnan(delay[1, 0])  # the inputs are not modified


def test_predicted_json_doubles_pp_for_forward_and_backward() -> None:
    plan = {"cost_s": 9.0, "compute_s": 5.0, "dp_s": 2.0, "pp_s": 1.0}
    assert predicted_json(plan) == {"compute_s": 5.0, "pipeline_s": 2.0, "data_parallel_s": 2.0, "total_s": 9.0}
    assert predicted_json(None) == {}
    assert predicted_json({"cost_s": float("inf")}) == {}


def test_preview_plans_every_layer_over_the_given_nodes() -> None:
    delay, bw = _matrices(3)
    out = compute_preview(_nodes(3), delay, bw, PreviewConfig(time_budget_s=0.2), now_s=100.0)
    assert out["source"] == "preview" and out["assumed_links"] == 5 and out["computed_at"] == 100.0
    stages = out["plan"]["stages"]
    assert stages[0]["layers"][0] == 0 and stages[-1]["layers"][1] == out["shape"]["num_layers"]
    assert {d for s in stages for d in s["devices"]} <= {"n0", "n1", "n2"}
    assert out["predicted"]["total_s"] == pytest.approx(out["plan"]["cost_s"])
    assert out["names"] == {"n0": "node 0", "n1": "node 1", "n2": "node 2"}


def test_preview_that_cannot_fit_says_why() -> None:
    delay, bw = _matrices(2)
    out = compute_preview(_nodes(2, memory_bytes=1 << 20), delay, bw, PreviewConfig(), now_s=0.0)
    assert out["source"] == "none" and out["plan"] is None
    assert "2 online nodes" in out["reason"]


def test_preview_cache_recomputes_on_membership_change_and_after_refresh() -> None:
    clock = FakeClock()
    preview = PlanPreview(clock, PreviewConfig(time_budget_s=0.1, refresh_s=30.0))
    asked: list[list[str]] = []

    def matrices(ids: list[str]):
        asked.append(ids)
        return _matrices(len(ids))

    async def run() -> None:
        first = await preview.get(_nodes(2), matrices)
        assert await preview.get(_nodes(2), matrices) is first
        assert preview.num_computations == 1
        await preview.get(_nodes(3), matrices)  # a node joined
        assert preview.num_computations == 2
        clock.advance(31.0)  # links may have been re-measured
        await preview.get(_nodes(3), matrices)
        assert preview.num_computations == 3
        empty = await preview.get([], matrices)
        assert empty["source"] == "none" and preview.num_computations == 3

    asyncio.run(run())
    assert asked == [["n0", "n1"], ["n0", "n1", "n2"], ["n0", "n1", "n2"]]


@pytest.mark.parametrize("kwargs", [{"time_budget_s": 0}, {"refresh_s": -1}, {"time_budget_s": math.nan}])
def test_preview_config_is_validated(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        PreviewConfig(**kwargs)


def test_worker_traffic_joins_nodes_and_derives_received_bytes_by_direction() -> None:
    from coordinator.web.sources import worker_traffic

    job = {
        "assignments": [{"node_id": f"n{s}{r}", "stage": s, "replica": r} for s in range(3) for r in range(2)],
        "workers": [{"stage": s, "replica": r, "step": 9, "bytes_raw": 1000, "bytes_sent": 100 * (s + 1) + r,
                     "bytes_forward": 10 * (s + 1) + r if s < 2 else 0, "bytes_backward": 1000 * s + r if s else 0}
                    for s in range(3) for r in range(2)],
    }
    got = {w["node_id"]: w for w in worker_traffic(job)}
    assert got["n11"]["bytes_sent"] == 201
    # stage 1 replica 1 hears activations from stage 0 replica 1 and gradients from stage 2 replica 1
    assert got["n11"]["bytes_received"] == 11 + 2001
    assert got["n00"]["bytes_received"] == 1000  # first stage: gradients only
    assert got["n21"]["bytes_received"] == 21  # last stage: activations only
    # Without the per-direction split the received bytes stay unknown.
    for w in job["workers"]:
        del w["bytes_forward"], w["bytes_backward"]
    assert all(w["bytes_received"] is None for w in worker_traffic(job))
    assert worker_traffic({"assignments": "x"}) == [] and worker_traffic({}) == []
