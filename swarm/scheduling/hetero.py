"""Heterogeneous extension (DESIGN.md 3.4): layer counts, memory and predicted iteration time.

For a partition into stage groups (each group the data-parallel replicas of one stage):
- a stage's speed is its slowest member's TFLOPS and its memory its smallest member's memory;
- each layer costs every member ``state_bytes_per_param * params_per_layer`` plus the
  activations of the micro-batches in flight (1F1B keeps at most ``min(m, D_PP)`` of them);
- one micro-batch takes ``t_s = layers_s * flops_per_layer / (tflops_s * EFFICIENCY)`` on stage
  s, and the pipeline computes for ``sum_s t_s + (m - 1) * max_s t_s`` (fill/drain bubble
  plus steady state, m micro-batches per pipeline);
- communication is the DT-FM model of 3.2 with the stage's gradient bytes (proportional to its
  layer count) and the job's (possibly compressed) activation bytes;
- predicted iteration time = compute + DP + 2 * PP.

Layer counts are chosen greedily, one layer at a time to the stage where it raises the
predicted time least (ties: lowest stage), within every stage's memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from swarm.scheduling.cluster import Cluster, JobShape

# Achieved fraction of peak TFLOPS in training. It scales every predicted compute time equally,
# so it changes the balance between compute and communication, not between devices.
EFFICIENCY = 0.4


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class StageModel:
    """Per-job constants for predicting stage times and memory (derived from JobShape)."""

    num_layers: int
    d_dp: int
    d_pp: int
    num_microbatches: int
    flops_per_layer_microbatch: float
    layer_memory_bytes: float  # per member: training state + in-flight activations of one layer
    grad_bytes_per_layer: float
    c_pp_bytes: float  # forward: activations of one pipeline's batch share over one boundary
    c_pp_backward_bytes: float  # backward: their gradients

    @staticmethod
    def build(job: JobShape, d_dp: int, d_pp: int) -> StageModel:
        m = job.num_microbatches(d_dp)
        inflight = min(m, d_pp)
        return StageModel(
            num_layers=job.num_layers,
            d_dp=d_dp,
            d_pp=d_pp,
            num_microbatches=m,
            flops_per_layer_microbatch=job.train_flops_per_token_per_layer() * job.seq_len * job.micro_batch_seqs,
            layer_memory_bytes=job.layer_state_bytes() + inflight * job.layer_activation_bytes_per_microbatch(),
            grad_bytes_per_layer=job.grad_bytes_per_layer(d_pp),
            c_pp_bytes=job.c_pp(d_dp),
            c_pp_backward_bytes=job.c_pp_backward(d_dp),
        )

    def seconds_per_layer(self, tflops: np.ndarray) -> np.ndarray:
        return self.flops_per_layer_microbatch / (np.asarray(tflops, dtype=np.float64) * 1e12 * EFFICIENCY)

    def layer_caps(self, memory_bytes: np.ndarray) -> np.ndarray:
        """How many layers each stage can hold (memory of its smallest member)."""
        mem = np.asarray(memory_bytes, dtype=np.float64)
        caps = np.floor(mem / self.layer_memory_bytes + 1e-9)
        return np.minimum(caps, self.num_layers).astype(np.int64)

    def compute_s(self, layers: np.ndarray, sec_per_layer: np.ndarray) -> tuple[float, np.ndarray]:
        t = layers * sec_per_layer
        return float(t.sum() + (self.num_microbatches - 1) * t.max()), t


def device_arrays(cluster: Cluster) -> tuple[np.ndarray, np.ndarray]:
    """TFLOPS and memory per device; unknown TFLOPS -> the median of the known ones (1.0 if
    none is known: only ratios matter then), unknown memory -> inf (not constrained)."""
    known = [d.tflops for d in cluster.devices if d.tflops is not None]
    default = float(np.median(known)) if known else 1.0
    tf = np.array([default if d.tflops is None else d.tflops for d in cluster.devices], dtype=np.float64)
    mem = np.array([math.inf if d.memory_bytes is None else float(d.memory_bytes) for d in cluster.devices])
    return tf, mem


def allocate_layers(
    model: StageModel,
    sec_per_layer: np.ndarray,
    caps: np.ndarray,
    dp0: np.ndarray | None = None,
    dp1: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Layer count per stage (stage order irrelevant) and how many layers did not fit.

    ``dp0``/``dp1`` (P, D): per member, the all-reduce time is ``dp0 + layers * dp1`` (seconds),
    so the allocation also weighs the gradient traffic a layer adds to its stage.
    """
    p = len(sec_per_layer)
    L = model.num_layers
    caps = np.asarray(caps, dtype=np.int64)
    layers = np.minimum(np.ones(p, dtype=np.int64), caps)
    placed = int(layers.sum())
    m1 = model.num_microbatches - 1
    while placed < L:
        open_ = layers < caps
        if not open_.any():
            break
        t = layers * sec_per_layer
        t_new = t + sec_per_layer
        # compute if stage g takes one more layer: sum + (m - 1) * max
        order = np.argsort(-t, kind="stable")
        top1, top2 = t[order[0]], (t[order[1]] if p > 1 else 0.0)
        max_other = np.where(np.arange(p) == order[0], top2, top1)
        comp = t.sum() + sec_per_layer + m1 * np.maximum(max_other, t_new)
        if dp0 is not None:
            dp_cur = (dp0 + layers[:, None] * dp1).max(axis=1)
            dp_new = (dp0 + (layers[:, None] + 1) * dp1).max(axis=1)
            o2 = np.argsort(-dp_cur, kind="stable")
            d1, d2 = dp_cur[o2[0]], (dp_cur[o2[1]] if p > 1 else 0.0)
            dmax_other = np.where(np.arange(p) == o2[0], d2, d1)
            comp = comp + np.maximum(dmax_other, dp_new)
        comp = np.where(open_, comp, np.inf)
        g = int(np.argmin(comp))
        layers[g] += 1
        placed += 1
    return layers, L - placed


def equal_layers(num_layers: int, d_pp: int) -> np.ndarray:
    """Balanced split: the first ``num_layers % d_pp`` stages get one layer more."""
    base, extra = divmod(num_layers, d_pp)
    return np.array([base + (1 if s < extra else 0) for s in range(d_pp)], dtype=np.int64)
