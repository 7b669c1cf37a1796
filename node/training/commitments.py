"""What a worker of a spot-checked job commits to, step by step: digests of the tensors it computed
on and sent (docs/security.md, "Verification"; the coordinator's side is coordinator/jobs/binding.py).

A checker recomputes a stage from copies its neighbours (the witnesses) send it. A witness that
sent a wrong copy would make an honest stage look wrong. So every worker reports, with each
step's ProgressReport, a digest of each tensor of each micro-batch it ran, *as it computed on or
sent it*:

- ``input``: the activation it received, decoded (not on the first stage);
- ``output``: what the next stage computes on, from this side (the decoded message:
  swarm/compression/replay.py ``sent_forward``) (not on the last stage);
- ``output_ref``: with AQ-SGD, its mirror of the next stage's m(x) rows and seen flags before the
  message (what the next stage's ``witness_output_ref`` copy holds);
- ``input_ref``: with AQ-SGD, its own m(x) rows and seen flags before the previous stage's
  message (the receiving end's side of the same state: the witness's own word on a
  ``witness_output_ref`` copy it sends, so a checker cannot claim a reference nobody committed to);
- ``grad_out``: the gradient it received from the next stage, decoded;
- ``grad_in``: what the previous stage gets of the gradient it sent (``sent_backward``).

A worker does not know which of its micro-batches are checked (the sampling seed goes to its
neighbours and checker only), so it commits to every one. The two ends of a boundary compute the
same values (one codec, the same state), so an honest sender's ``output`` is bit for bit its
receiver's ``input``, and each witness copy is bit for bit the checked node's own commitment.

Cost: one device-to-host copy and one BLAKE2b pass over each float32 tensor of the step
(bench/verification.py measures the checked job against an unchecked one). On a GPU the copy is
queued on the compute stream into pinned memory and hashed when the step's report is built
(:class:`StepCommitments`): a synchronous copy per tensor stalled the stream at every
micro-batch and took 8.7% of a checked step on the H200 (bench/verification.py, AQ-SGD).
"""

from __future__ import annotations

import hashlib

import torch

from swarm.transport.jobs import DIGEST_BYTES

def tensor_digest(t: torch.Tensor) -> bytes:
    """BLAKE2b-128 of ``t``'s shape and float32 bytes (the same wherever ``t`` lives)."""
    a = t.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.blake2b(repr(tuple(a.shape)).encode(), digest_size=DIGEST_BYTES)
    h.update(a.numpy().data)
    return h.digest()


def reference(rows: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """m(x) rows (B, ...) and their seen flags (B,) as one float32 tensor (B, numel + 1): the
    ``witness_output_ref`` layout."""
    return torch.cat([rows.float().reshape(len(seen), -1), seen.float().reshape(-1, 1).to(rows.device)], dim=1)


def _queued_copy(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, "torch.cuda.Event"]:
    """(pinned host copy, ``t``, event): ``t`` (on a GPU) copied to pinned host memory behind the
    work queued on the current stream, without waiting; ``t`` is kept alive until the event."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, t, done


class StepCommitments:
    """A step's commitments, (micro-batch, what, digest), digested off the compute path: a tensor
    on a GPU is copied to pinned host memory behind the work already queued on its stream (no
    wait) and hashed by :meth:`take`, when the step's report is built."""

    def __init__(self) -> None:
        self._items: list[tuple[int, str, object]] = []

    def add(self, micro_batch: int, what: str, t: torch.Tensor) -> None:
        t = t.detach()
        if not t.is_cuda:
            self._items.append((micro_batch, what, tensor_digest(t)))
            return
        self._items.append((micro_batch, what, _queued_copy(t.float())))

    def add_reference(self, micro_batch: int, rows: torch.Tensor, seen: torch.Tensor, what: str = "output_ref") -> None:
        """An ``output_ref`` or ``input_ref`` commitment: m(x) ``rows`` before a message (where the
        codec keeps them) and their ``seen`` flags (CPU), joined on the host (:func:`reference`)."""
        if not rows.is_cuda:
            self._items.append((micro_batch, what, tensor_digest(reference(rows, seen))))
            return
        self._items.append((micro_batch, what, (*_queued_copy(rows), seen.clone())))

    def take(self) -> list[tuple[int, str, bytes]]:
        """Every commitment added since the last call, digested (waits for queued copies)."""
        out = []
        for m, what, item in self._items:
            if not isinstance(item, bytes):
                host, done = item[0], item[2]
                done.synchronize()
                item = tensor_digest(host if len(item) == 3 else reference(host, item[3]))
            out.append((m, what, item))
        self._items = []
        return out
