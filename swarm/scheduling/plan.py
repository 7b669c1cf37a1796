"""The scheduler's output: a training plan with a stable plain-JSON form.

JSON (``Plan.to_json``)::

    {"objective": "dtfm_comm" | "predicted_iteration",
     "d_dp": 8, "d_pp": 8,
     "stages": [{"layers": [0, 3], "devices": [3, 10, ...], ...}, ...],   # pipeline order
     "cost_s": 3.44, "search_s": 0.8, "seed": 0,
     "breakdown": {"dp_s": ..., "pp_s": ..., "pp_total_s": ..., "compute_s": ...,
                   "boundary_s": [...], ...}}

Pipeline i runs through the i-th device of every stage's ``devices`` list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from swarm.errors import InvalidRequestError

OBJECTIVES = ("dtfm_comm", "predicted_iteration")


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanStage:
    """One pipeline stage: layers ``[first, last_exclusive)`` held by a data-parallel group.

    ``compute_s``: time of one micro-batch (forward + backward) on the group's slowest member;
    ``dp_s``: the group's gradient all-reduce time; ``memory_bytes``: what each member needs.
    """

    layers: tuple[int, int]
    devices: tuple[str | int, ...]
    compute_s: float | None = None
    dp_s: float | None = None
    memory_bytes: float | None = None

    def __post_init__(self) -> None:
        first, last = self.layers
        if not (0 <= first < last):
            raise InvalidRequestError(f"stage layers must be [first, last_exclusive) with first < last, got {self.layers}")
        if not self.devices:
            raise InvalidRequestError("a stage needs at least one device")
        object.__setattr__(self, "layers", (int(first), int(last)))
        object.__setattr__(self, "devices", tuple(self.devices))

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layers": list(self.layers), "devices": list(self.devices)}
        for k in ("compute_s", "dp_s", "memory_bytes"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out

    @staticmethod
    def from_json(obj: dict[str, Any]) -> PlanStage:
        try:
            return PlanStage(
                layers=tuple(obj["layers"]),
                devices=tuple(obj["devices"]),
                compute_s=obj.get("compute_s"),
                dp_s=obj.get("dp_s"),
                memory_bytes=obj.get("memory_bytes"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidRequestError(f"bad plan stage {obj!r}: {e}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """Stages in pipeline order and the predicted costs (seconds per iteration).

    ``cost_s`` is ``dp_s + 2 * pp_s`` (objective ``dtfm_comm``) or ``compute_s + dp_s + 2 *
    pp_s`` (objective ``predicted_iteration``). ``breakdown`` holds the details (per-boundary
    bottlenecks, bubble, micro-batches). ``search_s`` is the wall time the search took.
    """

    stages: tuple[PlanStage, ...]
    objective: str
    cost_s: float
    dp_s: float
    pp_s: float
    compute_s: float = 0.0
    search_s: float = 0.0
    seed: int = 0
    breakdown: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        stages = tuple(self.stages)
        if not stages:
            raise InvalidRequestError("a plan needs at least one stage")
        if self.objective not in OBJECTIVES:
            raise InvalidRequestError(f"plan objective must be one of {OBJECTIVES}, got {self.objective!r}")
        width = len(stages[0].devices)
        if any(len(s.devices) != width for s in stages):
            raise InvalidRequestError("every stage must have the same number of devices (one per pipeline)")
        if stages[0].layers[0] != 0 or any(a.layers[1] != b.layers[0] for a, b in zip(stages, stages[1:])):
            raise InvalidRequestError("stage layer ranges must start at 0 and be contiguous")
        ids = [d for s in stages for d in s.devices]
        if len(set(ids)) != len(ids):
            raise InvalidRequestError("a device appears in more than one stage or twice in one stage")
        for name in ("cost_s", "dp_s", "pp_s", "compute_s", "search_s"):
            if not math.isfinite(getattr(self, name)):
                raise InvalidRequestError(f"plan {name} must be finite")
        object.__setattr__(self, "stages", stages)

    @property
    def d_dp(self) -> int:
        return len(self.stages[0].devices)

    @property
    def d_pp(self) -> int:
        return len(self.stages)

    @property
    def num_layers(self) -> int:
        return self.stages[-1].layers[1]

    def pipeline(self, i: int) -> tuple[str | int, ...]:
        """Device ids of pipeline ``i`` in stage order."""
        return tuple(s.devices[i] for s in self.stages)

    def stage_of(self, device_id: str | int) -> tuple[int, int]:
        """(stage index, pipeline index) of a device; raises KeyError if it is not in the plan."""
        for s, st in enumerate(self.stages):
            for i, d in enumerate(st.devices):
                if d == device_id:
                    return s, i
        raise KeyError(device_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "d_dp": self.d_dp,
            "d_pp": self.d_pp,
            "stages": [s.to_json() for s in self.stages],
            "cost_s": self.cost_s,
            "dp_s": self.dp_s,
            "pp_s": self.pp_s,
            "compute_s": self.compute_s,
            "search_s": self.search_s,
            "seed": self.seed,
            "breakdown": dict(self.breakdown),
        }

    @staticmethod
    def from_json(obj: dict[str, Any]) -> Plan:
        if not isinstance(obj, dict):
            raise InvalidRequestError("a plan must be a JSON object")
        try:
            return Plan(
                stages=tuple(PlanStage.from_json(s) for s in obj["stages"]),
                objective=obj["objective"],
                cost_s=float(obj["cost_s"]),
                dp_s=float(obj["dp_s"]),
                pp_s=float(obj["pp_s"]),
                compute_s=float(obj.get("compute_s", 0.0)),
                search_s=float(obj.get("search_s", 0.0)),
                seed=int(obj.get("seed", 0)),
                breakdown=dict(obj.get("breakdown", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidRequestError(f"bad plan JSON: {e}") from None
