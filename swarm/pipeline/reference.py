"""Single-process reference training: the numbers a distributed job must reproduce.

Runs the same stages (same layer ranges, same prepared weights), the same batches and
micro-batches, the same per-stage AdamW/clipping and, optionally, the same boundary codecs
simulated in process. With the ``none`` codec a job split across nodes must give these losses
to float tolerance; with AQ-SGD it must match the simulated boundary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from swarm.model.config import ModelConfig
from swarm.model.stage import StageModel
from swarm.pipeline.data import BatchOrder, TokenDataset
from swarm.pipeline.optim import OptimConfig, clip_and_step, make_optimizer
from swarm.pipeline.stage import StageRunner

# (tensor, sample_ids, step) -> what the receiving side computes on
BoundaryFn = Callable[[torch.Tensor, Sequence[int], int], torch.Tensor]


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatedBoundary:
    """What crossing one stage boundary does to activations (forward) and gradients (backward)."""

    forward: BoundaryFn
    backward: BoundaryFn


def identity_boundary() -> SimulatedBoundary:
    return SimulatedBoundary(forward=lambda t, ids, step: t, backward=lambda t, ids, step: t)


def build_stages(
    config: ModelConfig, tensors: dict[str, torch.Tensor], ranges: Sequence[tuple[int, int]]
) -> list[StageModel]:
    stages = []
    for i, (first, last) in enumerate(ranges):
        stage = StageModel(config, first, last, is_first=i == 0, is_last=i == len(ranges) - 1)
        stage.load_hf_state(tensors)
        stages.append(stage)
    return stages


def train_reference(
    *,
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    dataset: TokenDataset,
    order: BatchOrder,
    optim: OptimConfig,
    ranges: Sequence[tuple[int, int]],
    steps: int,
    boundaries: Sequence[Sequence[SimulatedBoundary]] | None = None,
) -> tuple[list[float], list[StageModel]]:
    """Train ``steps`` steps in one process; returns (mean loss per step, the trained stages).

    All replicas' micro-batches are run here one after another; dividing each loss by the total
    number of micro-batches equals averaging the replicas' gradients, as hivemind does.
    ``boundaries[r][k]`` is boundary ``k`` of pipeline (replica) ``r``; identity when None.
    """
    stages = build_stages(config, tensors, ranges)
    n = len(stages)
    if not optim.clip_params:  # as the stage workers clip (node/training/worker_setup.py)
        optim = dataclasses.replace(optim, clip_params=config.num_parameters())
    if boundaries is None:
        boundaries = [[identity_boundary() for _ in range(n - 1)] for _ in range(order.num_replicas)]
    if len(boundaries) != order.num_replicas or any(len(b) != n - 1 for b in boundaries):
        raise ValueError(f"need {order.num_replicas} replica(s) x {n - 1} boundaries")
    total_micro = order.num_micro_batches * order.num_replicas
    runners = [
        StageRunner(s, is_first=i == 0, is_last=i == n - 1, loss_scale=1.0 / total_micro) for i, s in enumerate(stages)
    ]
    optimizers = [make_optimizer(s.parameters(), optim) for s in stages]
    losses: list[float] = []
    for step in range(steps):
        step_losses = []
        for replica in range(order.num_replicas):
            for m, ids in enumerate(order.micro_batches(step, replica)):
                key = replica * order.num_micro_batches + m
                x = torch.from_numpy(dataset.inputs(ids))
                labels = torch.from_numpy(dataset.labels(ids))
                for i, runner in enumerate(runners):
                    out = runner.forward(key, x, labels if i == n - 1 else None)
                    if out is not None:
                        x = boundaries[replica][i].forward(out, ids.tolist(), step)
                grad = None
                for i in range(n - 1, -1, -1):
                    gin = runners[i].backward(key, grad)
                    if i > 0:
                        grad = boundaries[replica][i - 1].backward(gin, ids.tolist(), step)
            step_losses.append(runners[-1].step_loss())
        for stage, opt in zip(stages, optimizers):
            clip_and_step(opt, list(stage.parameters()), step, optim)
        losses.append(sum(step_losses) / len(step_losses))
    return losses, stages
