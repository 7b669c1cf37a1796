"""One pipeline stage's forward and backward passes per micro-batch, without any network.

The runner keeps, per in-flight micro-batch, the stage's input (as a leaf that collects its
gradient) and output (or the loss on the last stage), so ``backward`` can run later in whatever
order the schedule says. Training of a split model and the single-process reference both use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swarm.errors import InvalidRequestError


@dataclass(slots=True)
class _InFlight:
    inputs: torch.Tensor | None  # leaf requiring grad (None on the first stage: token ids)
    output: torch.Tensor  # hidden states, or the scaled loss on the last stage


class StageRunner:
    """Runs a stage module; ``loss_scale`` divides each micro-batch loss (1 / micro-batches per step)."""

    def __init__(self, module: nn.Module, *, is_first: bool, is_last: bool, loss_scale: float) -> None:
        if not loss_scale > 0:
            raise InvalidRequestError("loss_scale must be positive")
        self.module = module
        self.is_first, self.is_last = is_first, is_last
        self.loss_scale = loss_scale
        self._inflight: dict[int, _InFlight] = {}
        self.losses: dict[int, float] = {}  # micro-batch -> unscaled mean token loss (last stage)

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    def forward(self, micro_batch: int, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | None:
        """Forward one micro-batch. ``x``: token ids (b, S) on the first stage, else hidden (b, S, H).

        Returns the hidden states to send on (b, S, H), or None on the last stage, which needs
        ``labels`` (b, S) and records the loss.
        """
        if micro_batch in self._inflight:
            raise InvalidRequestError(f"micro-batch {micro_batch} is already in flight on this stage")
        inputs = None
        if not self.is_first:
            inputs = x.detach().requires_grad_(True)
            x = inputs
        out = self.module(x)
        if self.is_last:
            if labels is None:
                raise InvalidRequestError("the last stage needs labels to compute the loss")
            logits = out.float()  # (b, S, V)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            self.losses[micro_batch] = float(loss.detach())
            self._inflight[micro_batch] = _InFlight(inputs=inputs, output=loss * self.loss_scale)
            return None
        self._inflight[micro_batch] = _InFlight(inputs=inputs, output=out)
        return out.detach()

    def backward(self, micro_batch: int, grad_output: torch.Tensor | None = None) -> torch.Tensor | None:
        """Backward one micro-batch, accumulating parameter gradients.

        ``grad_output`` is the gradient w.r.t. this stage's output (None on the last stage).
        Returns the gradient w.r.t. this stage's input to send back, or None on the first stage.
        """
        item = self._inflight.pop(micro_batch, None)
        if item is None:
            raise InvalidRequestError(f"micro-batch {micro_batch} has no forward pass on this stage")
        if self.is_last:
            item.output.backward()
        else:
            if grad_output is None or grad_output.shape != item.output.shape:
                raise InvalidRequestError(
                    f"gradient for micro-batch {micro_batch} has shape "
                    f"{None if grad_output is None else tuple(grad_output.shape)}, expected {tuple(item.output.shape)}"
                )
            item.output.backward(grad_output.to(item.output.dtype))
        if item.inputs is None:
            return None
        return item.inputs.grad.detach()

    def discard(self, micro_batch: int) -> None:
        """Drop one micro-batch in flight and its loss: its backward will not run (a holder-loss
        fence dropped it, node/training/worker.py); the step's gradient is the others'."""
        self._inflight.pop(micro_batch, None)
        self.losses.pop(micro_batch, None)

    def reset(self) -> None:
        """Drop any in-flight micro-batches and recorded losses (after a failed step)."""
        self._inflight.clear()
        self.losses.clear()

    def step_loss(self) -> float | None:
        """Mean loss over the micro-batches recorded since the last call (last stage), then clears."""
        if not self.losses:
            return None
        loss = sum(self.losses.values()) / len(self.losses)
        self.losses.clear()
        return loss
