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
- ``grad_out``: the gradient it received from the next stage, decoded;
- ``grad_in``: what the previous stage gets of the gradient it sent (``sent_backward``).

A worker does not know which of its micro-batches are checked (the sampling seed goes to its
neighbours and checker only), so it commits to every one. The two ends of a boundary compute the
same values (one codec, the same state), so an honest sender's ``output`` is bit for bit its
receiver's ``input``, and each witness copy is bit for bit the checked node's own commitment.

Cost: one device-to-host copy and one BLAKE2b pass over each float32 tensor of the step
(bench/verification.py measures the checked job against an unchecked one).
"""

from __future__ import annotations

import hashlib

import torch

from swarm.transport.jobs import DIGEST_BYTES

# a witness copy's kind -> the checked node's commitment it must equal
COPY_WHAT = {"witness_input": "input", "witness_output": "output", "witness_output_ref": "output_ref",
             "witness_grad_out": "grad_out", "witness_grad_in": "grad_in"}


def tensor_digest(t: torch.Tensor) -> bytes:
    """BLAKE2b-128 of ``t``'s shape and float32 bytes (the same wherever ``t`` lives)."""
    a = t.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.blake2b(repr(tuple(a.shape)).encode(), digest_size=DIGEST_BYTES)
    h.update(a.numpy().data)
    return h.digest()


def reference_rows(codec, ids) -> torch.Tensor:
    """An AQ-SGD boundary's m(x) rows of ``ids`` with their seen flags, float32 on the CPU, as
    either end reads them from its state before a message: the ``witness_output_ref`` layout."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    return torch.cat([codec.store.read(ids, "cpu").float().reshape(len(ids), -1),
                      codec.store.seen(ids).float().reshape(-1, 1)], dim=1)
