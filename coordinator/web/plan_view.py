"""What ``GET /api/plan`` shows: the running job's plan, else a cached preview, else nothing.

The preview answers "what would the scheduler do with the nodes online right now?" for a small
default job shape (:data:`PREVIEW_SHAPE`), computed with :func:`swarm.scheduling.plan_training`
over the live registry and the measured link matrices. It is cached: recomputed only when the set
of online nodes (or their hardware) changes, or every ``refresh_s`` so new link measurements
show up; the search runs in a worker thread with a small time budget, never on the event loop.

Response (plain JSON)::

    {"source": "job" | "preview" | "none",
     "job_id": str | null,            # source == "job"
     "plan": Plan.to_json() | null,
     "predicted": {"compute_s", "pipeline_s", "data_parallel_s", "total_s"},  # parts present
     "names": {node_id: name},
     "shape": JobShape.to_json(),     # source == "preview"
     "assumed_links": int,            # preview: unmeasured links filled with ASSUMED_* values
     "computed_at": unix seconds,
     "reason": str,                   # why there is no plan, or where it came from
     "traffic": [{"node_id", "stage", "replica", "bytes_sent", "bytes_raw", "step"}]}  # source == "job"
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from swarm.clock import Clock
from swarm.errors import ConfigError, SwarmError

from coordinator.web.metrics import plan_breakdown_s

log = logging.getLogger(__name__)

# A small GPT-2-like job (12 layers, hidden 768, ~124M parameters): big enough that the plan has
# stages worth drawing on a few nodes, small enough to fit on any volunteer's machine.
PREVIEW_SHAPE_JSON: dict[str, Any] = {
    "num_layers": 12,
    "hidden_size": 768,
    "seq_len": 512,
    "num_params": 124e6,
    "global_batch_seqs": 32,
    "micro_batch_seqs": 4,
    "act_bytes_per_value": 2.0,
}
# Links not measured yet are planned as a modest home connection (and counted in the answer).
ASSUMED_DELAY_S = 0.010
ASSUMED_BANDWIDTH_BPS = 100e6 / 8  # 100 Mbit/s in bytes per second


@dataclass(frozen=True, slots=True, kw_only=True)
class PreviewConfig:
    """How the preview is planned: search budget per computation and how long a result lives."""

    time_budget_s: float = 0.25
    refresh_s: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.time_budget_s) and self.time_budget_s > 0):
            raise ConfigError("plan preview time_budget_s must be > 0 seconds")
        if not (math.isfinite(self.refresh_s) and self.refresh_s > 0):
            raise ConfigError("plan preview refresh_s must be > 0 seconds")


def predicted_json(plan: Mapping[str, Any] | None) -> dict[str, float]:
    """The plan's predicted step time by part, with ``_s`` keys for the page."""
    names = {"compute": "compute_s", "pipeline": "pipeline_s", "data_parallel": "data_parallel_s", "total": "total_s"}
    return {names[k]: v for k, v in plan_breakdown_s(plan).items()}


def no_plan(reason: str, *, names: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"source": "none", "job_id": None, "plan": None, "predicted": {}, "names": dict(names or {}),
            "reason": reason}


def job_plan_json(job_id: str, plan: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    return {"source": "job", "job_id": str(job_id), "plan": dict(plan), "predicted": predicted_json(plan),
            "names": dict(names), "reason": f"plan of running job {job_id}"}


def fill_matrices(
    delay_s: np.ndarray, bandwidth_Bps: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Copies of the matrices with unmeasured (NaN/inf/<= 0) off-diagonal links set to the assumed
    values; returns them and how many links were assumed."""
    n = delay_s.shape[0]
    off = ~np.eye(n, dtype=bool)
    delay = np.array(delay_s, dtype=np.float64)
    bw = np.array(bandwidth_Bps, dtype=np.float64)
    missing = off & (~np.isfinite(delay) | ~np.isfinite(bw) | ~(bw > 0) | (delay < 0))
    delay[missing] = ASSUMED_DELAY_S
    bw[missing] = ASSUMED_BANDWIDTH_BPS
    np.fill_diagonal(delay, 0.0)
    np.fill_diagonal(bw, 1.0)  # ignored by the scheduler; must only be finite and > 0
    return delay, bw, int(missing.sum())


@dataclass(frozen=True, slots=True, kw_only=True)
class OnlineNode:
    """What the preview needs of a node."""

    id: str
    name: str
    tflops: float
    memory_bytes: int


def compute_preview(
    nodes: Sequence[OnlineNode], delay_s: np.ndarray, bandwidth_Bps: np.ndarray, config: PreviewConfig, now_s: float
) -> dict[str, Any]:
    """Plan the default job over ``nodes`` (blocking: run it in a worker thread)."""
    from swarm.scheduling import Cluster, Device, JobShape, plan_training

    names = {n.id: n.name for n in nodes}
    if not nodes:
        return no_plan("no online nodes to plan over")
    delay, bw, assumed = fill_matrices(delay_s, bandwidth_Bps)
    devices = tuple(
        Device(id=n.id, tflops=n.tflops if n.tflops > 0 else None, memory_bytes=n.memory_bytes or None)
        for n in nodes
    )
    shape = JobShape.from_json(PREVIEW_SHAPE_JSON)
    try:
        plan = plan_training(
            Cluster(devices=devices, delay_s=delay, bandwidth_Bps=bw, name="online nodes"),
            shape,
            seed=config.seed,
            time_budget_s=config.time_budget_s,
        )
    except NotImplementedError:
        return no_plan("the scheduler in this build cannot plan training jobs yet", names=names)
    except SwarmError as exc:
        out = no_plan(f"no preview plan for the default job over {len(nodes)} online nodes: {exc}", names=names)
        out["shape"] = shape.to_json()
        return out
    plan_json = plan.to_json()
    return {
        "source": "preview",
        "job_id": None,
        "plan": plan_json,
        "predicted": predicted_json(plan_json),
        "names": names,
        "shape": shape.to_json(),
        "assumed_links": assumed,
        "computed_at": now_s,
        "reason": (
            f"preview: how the scheduler would place a {shape.num_layers}-layer ~{shape.num_params / 1e6:.0f}M-parameter"
            f" job over the {len(nodes)} online nodes"
            + (f" ({assumed} unmeasured links assumed at 100 Mbit/s, 10 ms)" if assumed else "")
        ),
    }


class PlanPreview:
    """Caches :func:`compute_preview`. Used from the HTTP server's single event loop; concurrent
    requests for a stale preview wait for one computation instead of starting their own."""

    def __init__(self, clock: Clock, config: PreviewConfig | None = None) -> None:
        self._clock = clock
        self.config = config or PreviewConfig()
        self._key: tuple | None = None
        self._at_s = -math.inf
        self._value: dict[str, Any] | None = None
        self._lock: asyncio.Lock | None = None
        self.num_computations = 0

    def _fresh(self, key: tuple, now: float) -> dict[str, Any] | None:
        if self._value is not None and key == self._key and now - self._at_s < self.config.refresh_s:
            return self._value
        return None

    async def get(
        self, nodes: Sequence[OnlineNode], matrices: Callable[[list[str]], tuple[np.ndarray, np.ndarray]]
    ) -> dict[str, Any]:
        """The preview for these online nodes; ``matrices(ids)`` gives (delay_s, bandwidth_Bps)."""
        if not nodes:
            return no_plan("no online nodes to plan over")
        key = tuple((n.id, n.tflops, n.memory_bytes) for n in nodes)
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            now = self._clock.time()
            cached = self._fresh(key, now)
            if cached is not None:
                return cached
            delay, bw = matrices([n.id for n in nodes])
            loop = asyncio.get_running_loop()
            value = await loop.run_in_executor(None, compute_preview, list(nodes), delay, bw, self.config, now)
            self._key, self._at_s, self._value = key, now, value
            self.num_computations += 1
        log.debug("plan preview computed num_nodes=%d source=%s", len(nodes), value["source"])
        return value
