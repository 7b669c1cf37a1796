"""The scheduler's inputs: devices, their links, and the shape of the training job.

The JSON form is the one of ``shared/bench/scheduler/scenarios/*.json`` (DT-FM's five
scenarios): ``delay_s`` and ``bandwidth_Bps`` N x N matrices, optional ``regions``, ``d_dp`` /
``d_pp`` and a ``model`` object; optionally ``devices``: ``[{"id", "tflops", "memory_bytes",
"region"}]``. That file is also what ``swarm plan --cluster`` reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from swarm.errors import InvalidRequestError

# Bytes of training state per parameter with mixed-precision Adam: fp16 weights (2) + fp16
# gradients (2) + fp32 master weights, Adam m and v (12).
DEFAULT_STATE_BYTES_PER_PARAM = 16.0
# Activation memory of one transformer layer per token without recomputation, in units of the
# hidden size (Korthikanti et al. 2022: 34 * s * b * h bytes in fp16, attention scores aside).
ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN = 34.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    """One GPU (or CPU node). ``tflops``/``memory_bytes`` None means unknown (not constrained)."""

    id: str | int
    tflops: float | None = None
    memory_bytes: int | None = None
    region: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.id, bool) or not isinstance(self.id, (str, int)) or self.id == "":
            raise InvalidRequestError(f"device id must be a non-empty string or an int, got {self.id!r}")
        if self.tflops is not None and not (math.isfinite(self.tflops) and self.tflops > 0):
            raise InvalidRequestError(f"device {self.id}: tflops must be > 0, got {self.tflops}")
        if self.memory_bytes is not None and not self.memory_bytes > 0:
            raise InvalidRequestError(f"device {self.id}: memory_bytes must be > 0, got {self.memory_bytes}")


def _matrix(name: str, value: Any, n: int) -> np.ndarray:
    try:
        m = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"{name} must be an {n} x {n} matrix of numbers: {e}") from None
    if m.shape != (n, n):
        raise InvalidRequestError(f"{name} must be {n} x {n} (one row per device), got shape {m.shape}")
    m = m.copy()
    np.fill_diagonal(m, 0.0)  # the diagonal is never used; keep it finite
    m.setflags(write=False)
    return m


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Cluster:
    """N devices and their pairwise one-way ``delay_s`` (s) and ``bandwidth_Bps`` (bytes/s).

    Matrices are indexed like ``devices``; the diagonal is ignored. They may be asymmetric:
    ``[i][j]`` is the link from device i to device j.
    """

    devices: tuple[Device, ...]
    delay_s: np.ndarray
    bandwidth_Bps: np.ndarray
    name: str = ""

    def __post_init__(self) -> None:
        devices = tuple(self.devices)
        if not devices:
            raise InvalidRequestError("a cluster needs at least one device")
        ids = [d.id for d in devices]
        if len(set(ids)) != len(ids):
            raise InvalidRequestError("device ids must be unique")
        n = len(devices)
        delay = _matrix("delay_s", self.delay_s, n)
        bw = _matrix("bandwidth_Bps", self.bandwidth_Bps, n)
        off = ~np.eye(n, dtype=bool)
        if not np.all(np.isfinite(delay[off])) or np.any(delay[off] < 0):
            raise InvalidRequestError("delay_s entries must be finite and >= 0 (seconds)")
        if np.any(~(bw[off] > 0)):
            raise InvalidRequestError("bandwidth_Bps entries must be > 0 (bytes per second; use a small value for bad links)")
        object.__setattr__(self, "devices", devices)
        object.__setattr__(self, "delay_s", delay)
        object.__setattr__(self, "bandwidth_Bps", bw)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def ids(self) -> tuple[str | int, ...]:
        return tuple(d.id for d in self.devices)

    def is_homogeneous(self) -> bool:
        """Same (or unknown) TFLOPS and memory on every device: the DT-FM setting."""
        tf = {d.tflops for d in self.devices}
        mem = {d.memory_bytes for d in self.devices}
        return len(tf) == 1 and len(mem) == 1

    def subset(self, indices: list[int]) -> Cluster:
        idx = np.asarray(indices, dtype=int)
        return Cluster(
            devices=tuple(self.devices[i] for i in idx),
            delay_s=self.delay_s[np.ix_(idx, idx)],
            bandwidth_Bps=self.bandwidth_Bps[np.ix_(idx, idx)],
            name=self.name,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_devices": self.num_devices,
            "devices": [
                {k: v for k, v in (("id", d.id), ("tflops", d.tflops), ("memory_bytes", d.memory_bytes), ("region", d.region)) if v is not None}
                for d in self.devices
            ],
            "delay_s": self.delay_s.tolist(),
            "bandwidth_Bps": self.bandwidth_Bps.tolist(),
        }

    @staticmethod
    def from_json(obj: dict[str, Any]) -> Cluster:
        if not isinstance(obj, dict):
            raise InvalidRequestError("a cluster must be a JSON object")
        if "delay_s" not in obj or "bandwidth_Bps" not in obj:
            raise InvalidRequestError("a cluster needs 'delay_s' and 'bandwidth_Bps' matrices")
        n = len(obj["delay_s"])
        if "num_devices" in obj and obj["num_devices"] != n:
            raise InvalidRequestError(f"num_devices is {obj['num_devices']} but delay_s has {n} rows")
        regions = obj.get("regions")
        raw = obj.get("devices")
        if raw is None:
            devices = tuple(Device(id=i, region=None if regions is None else str(regions[i])) for i in range(n))
        else:
            if not isinstance(raw, list) or len(raw) != n:
                raise InvalidRequestError(f"'devices' must list {n} devices, one per matrix row")
            devices = []
            for i, d in enumerate(raw):
                if not isinstance(d, dict):
                    raise InvalidRequestError(f"devices[{i}] must be an object")
                mem = d.get("memory_bytes")
                devices.append(
                    Device(
                        id=d.get("id", i),
                        tflops=None if d.get("tflops") is None else float(d["tflops"]),
                        memory_bytes=None if mem is None else int(mem),
                        region=d.get("region", None if regions is None else str(regions[i])),
                    )
                )
            devices = tuple(devices)
        return Cluster(devices=devices, delay_s=obj["delay_s"], bandwidth_Bps=obj["bandwidth_Bps"], name=str(obj.get("name", "")))


@dataclass(frozen=True, slots=True, kw_only=True)
class JobShape:
    """The training job as the scheduler sees it.

    ``global_batch_seqs`` sequences per iteration are split over ``dp`` pipelines, each running
    micro-batches of ``micro_batch_seqs``. ``act_bytes_per_value`` is the size of one activation
    value sent forward across a stage boundary (2 for fp16, about 0.28 for 2-bit AQ-SGD changes),
    ``act_grad_bytes_per_value`` that of one activation gradient sent backward (None: the same);
    ``grad_bytes_per_value`` that of one weight gradient value in the data-parallel all-reduce.
    ``dp``/``pp`` None: the planner chooses. ``c_dp_bytes``/``c_pp_bytes`` override the derived
    message sizes (DT-FM scenario files carry them): c_dp is one stage's gradient bytes at the
    balanced split (num_layers / pp layers), c_pp the activation bytes of one pipeline's share of
    the batch crossing one boundary forward; ``c_pp_backward_bytes`` the gradient bytes crossing
    it backward (None: c_pp scaled by act_grad_bytes_per_value / act_bytes_per_value).
    """

    num_layers: int
    hidden_size: int
    seq_len: int
    num_params: float
    global_batch_seqs: float
    micro_batch_seqs: float = 1.0
    act_bytes_per_value: float = 2.0
    act_grad_bytes_per_value: float | None = None
    grad_bytes_per_value: float = 4.0
    state_bytes_per_param: float = DEFAULT_STATE_BYTES_PER_PARAM
    dp: int | None = None
    pp: int | None = None
    c_dp_bytes: float | None = None
    c_pp_bytes: float | None = None
    c_pp_backward_bytes: float | None = None
    recompute: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidRequestError(f"job {name} must be an integer >= 1, got {v!r}")
        for name in ("num_params", "global_batch_seqs", "micro_batch_seqs", "act_bytes_per_value", "grad_bytes_per_value", "state_bytes_per_param"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise InvalidRequestError(f"job {name} must be a number > 0, got {v!r}")
        for name in ("dp", "pp"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InvalidRequestError(f"job {name} must be an integer >= 1 or None, got {v!r}")
        if not isinstance(self.recompute, bool):
            raise InvalidRequestError(f"job recompute must be true or false, got {self.recompute!r}")
        if self.pp is not None and self.pp > self.num_layers:
            raise InvalidRequestError(f"pp={self.pp} stages cannot split {self.num_layers} layers; use pp <= num_layers")
        for name in ("act_grad_bytes_per_value", "c_dp_bytes", "c_pp_bytes", "c_pp_backward_bytes"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise InvalidRequestError(f"job {name} must be > 0 or None, got {v!r}")

    # ---- derived sizes (bytes, flops) ------------------------------------------------------
    def grad_bytes_per_layer(self, pp: int) -> float:
        """Gradient bytes of one layer in the all-reduce (from c_dp_bytes when given)."""
        if self.c_dp_bytes is not None:
            return self.c_dp_bytes / (self.num_layers / pp)
        return self.num_params / self.num_layers * self.grad_bytes_per_value

    def c_pp(self, dp: int) -> float:
        """Activation bytes of one pipeline's batch share crossing one stage boundary."""
        if self.c_pp_bytes is not None:
            return self.c_pp_bytes
        return self.global_batch_seqs / dp * self.seq_len * self.hidden_size * self.act_bytes_per_value

    def c_pp_backward(self, dp: int) -> float:
        """Gradient bytes of one pipeline's batch share crossing one stage boundary backward."""
        if self.c_pp_backward_bytes is not None:
            return self.c_pp_backward_bytes
        if self.act_grad_bytes_per_value is None:
            return self.c_pp(dp)
        if self.c_pp_bytes is not None:
            return self.c_pp_bytes * (self.act_grad_bytes_per_value / self.act_bytes_per_value)
        return self.global_batch_seqs / dp * self.seq_len * self.hidden_size * self.act_grad_bytes_per_value

    def num_microbatches(self, dp: int) -> int:
        return max(1, math.ceil(self.global_batch_seqs / dp / self.micro_batch_seqs - 1e-9))

    def train_flops_per_token_per_layer(self) -> float:
        """Forward + backward FLOPs of one token through one layer (6 * params + attention);
        with activation recomputation one more forward pass (x 4/3)."""
        flops = 6.0 * self.num_params / self.num_layers + 12.0 * self.seq_len * self.hidden_size
        return flops * (4.0 / 3.0 if self.recompute else 1.0)

    def layer_state_bytes(self) -> float:
        return self.num_params / self.num_layers * self.state_bytes_per_param

    def layer_activation_bytes_per_microbatch(self) -> float:
        """Activations one layer keeps per in-flight micro-batch (only its fp16 input when
        activations are recomputed in the backward pass)."""
        per_hidden = 2.0 if self.recompute else ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN
        return per_hidden * self.hidden_size * self.seq_len * self.micro_batch_seqs

    @staticmethod
    def from_json(obj: dict[str, Any], *, dp: int | None = None, pp: int | None = None) -> JobShape:
        """From a scenario file's ``model`` object (DT-FM field names accepted)."""
        if not isinstance(obj, dict):
            raise InvalidRequestError("the job/model must be a JSON object")
        try:
            layers = int(obj["num_layers"])
            seq = int(obj["seq_len"])
            gb = obj.get("global_batch_seqs")
            if gb is None and "global_batch_tokens" in obj:
                gb = float(obj["global_batch_tokens"]) / seq
            mb = obj.get("micro_batch_seqs", obj.get("tasklet_microbatch_seqs", 1.0))
            return JobShape(
                num_layers=layers,
                hidden_size=int(obj["hidden_size"]),
                seq_len=seq,
                num_params=float(obj["num_params"]),
                global_batch_seqs=float(gb if gb is not None else 1.0),
                micro_batch_seqs=float(mb),
                act_bytes_per_value=float(obj.get("act_bytes_per_value", 2.0)),
                act_grad_bytes_per_value=_opt_float(obj, "act_grad_bytes_per_value"),
                grad_bytes_per_value=float(obj.get("grad_bytes_per_value", obj.get("grad_bytes_per_param", 4.0))),
                state_bytes_per_param=float(obj.get("state_bytes_per_param", DEFAULT_STATE_BYTES_PER_PARAM)),
                dp=obj.get("dp", dp),
                pp=obj.get("pp", pp),
                c_dp_bytes=None if obj.get("c_dp_bytes") is None else float(obj["c_dp_bytes"]),
                c_pp_bytes=None if obj.get("c_pp_bytes") is None else float(obj["c_pp_bytes"]),
                c_pp_backward_bytes=_opt_float(obj, "c_pp_backward_bytes"),
                recompute=bool(obj.get("recompute", False)),
            )
        except KeyError as e:
            raise InvalidRequestError(f"the job/model object lacks {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(f"bad job/model field: {e}") from None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if getattr(self, k) is not None}


def _opt_float(obj: dict[str, Any], key: str) -> float | None:
    return None if obj.get(key) is None else float(obj[key])


def load_cluster_file(path: str | Path) -> tuple[Cluster, JobShape | None]:
    """Read a scenario/cluster JSON file: the cluster, and the job when it has a ``model``."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except OSError as e:
        raise InvalidRequestError(f"cannot read cluster file {p}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"cluster file {p} is not valid JSON: {e}") from None
    return cluster_and_job_from_json(obj)


def cluster_and_job_from_json(obj: dict[str, Any]) -> tuple[Cluster, JobShape | None]:
    cluster = Cluster.from_json(obj)
    job_obj = obj.get("job", obj.get("model"))
    job = None
    if job_obj is not None:
        job = JobShape.from_json(job_obj, dp=obj.get("d_dp"), pp=obj.get("d_pp"))
    return cluster, job


__all__ = ["Cluster", "Device", "JobShape", "load_cluster_file", "cluster_and_job_from_json"]
