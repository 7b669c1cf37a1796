"""Boundary codecs of a training job, built the same way on nodes and in the reference trainer.

Boundary ``k`` joins stage ``k`` (upstream: encodes activations, decodes gradients) and stage
``k + 1`` (downstream: decodes activations, encodes gradients). Each side of each boundary of
each pipeline (replica) has its own :class:`~swarm.compression.BoundaryCodec`, seeded with
:func:`~swarm.compression.boundary_seed`, keyed by job and dataset, with its own AQ-SGD store.
Given the same messages in the same order, the two sides and the in-process simulation compute
bit-identical numbers.
"""

from __future__ import annotations

import torch

from swarm.compression import BoundaryCodec, CodecMessage, CodecSpec, boundary_seed, make_store
from swarm.pipeline.reference import SimulatedBoundary


def state_key(job_id: str, dataset_key: str) -> str:
    return f"{job_id}:{dataset_key}"


def make_codec(
    spec: CodecSpec, *, side: str, boundary: int, key: str, num_samples: int, row_shape: tuple[int, ...],
    device: torch.device | str = "cpu", storage: str = "ram",
) -> BoundaryCodec:
    """One side ("up" or "down") of boundary ``boundary``. ``storage``: "ram" or a directory."""
    if not isinstance(spec, CodecSpec):
        raise TypeError(f"make_codec takes a parsed CodecSpec, not {type(spec).__name__}; use CodecSpec.parse")
    store = ef_store = None
    if spec.kind == "aqsgd":
        store = make_store(key=key, num_samples=num_samples, row_shape=row_shape,
                           storage=storage if storage == "ram" else f"{storage}/b{boundary}-{side}",
                           device=device, reset=True)
    if spec.error_feedback and side == "down":
        ef_store = make_store(key=key, num_samples=num_samples, row_shape=row_shape,
                              storage=storage if storage == "ram" else f"{storage}/b{boundary}-ef",
                              device=device, reset=True)
    return BoundaryCodec(spec, key=key, store=store, ef_store=ef_store, device=device,
                         seed=boundary_seed(spec, boundary))


def simulated_boundary(spec: CodecSpec, *, boundary: int, key: str, num_samples: int,
                       row_shape: tuple[int, ...]) -> SimulatedBoundary:
    """Both sides of a boundary in one process, passing real bytes between them."""
    up = make_codec(spec, side="up", boundary=boundary, key=key, num_samples=num_samples, row_shape=row_shape)
    down = make_codec(spec, side="down", boundary=boundary, key=key, num_samples=num_samples, row_shape=row_shape)

    def forward(t: torch.Tensor, ids, step: int) -> torch.Tensor:
        msg = CodecMessage.from_bytes(up.encode_forward(t, ids).to_bytes())
        return down.decode_forward(msg, ids, dtype=t.dtype)

    def backward(g: torch.Tensor, ids, step: int) -> torch.Tensor:
        msg = CodecMessage.from_bytes(down.encode_backward(g, ids).to_bytes())
        return up.decode_backward(msg, ids, dtype=g.dtype)

    return SimulatedBoundary(forward=forward, backward=backward)
