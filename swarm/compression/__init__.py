"""Activation and gradient compression for pipeline boundaries (pure torch; no network).

- :mod:`~swarm.compression.quantizer` -- k-bit (2..8) group quantization, dense bit packing,
  round-to-nearest or stochastic rounding (reference implementation).
- :mod:`~swarm.compression.backends` -- fused fast paths: a C kernel on CPU, Triton on CUDA.
- :class:`EncodedTensor` -- one tensor on the wire (shape, dtype, bits, scales), exact sizes.
- :class:`CodecSpec` -- ``none`` | ``direct:fw=4,bw=8`` | ``aqsgd:fw=3,bw=6`` (+ options).
- :class:`RamStore` / :class:`MemmapStore` -- AQ-SGD's per-sample m(x), keyed by job+dataset.
- :class:`BoundaryCodec` -- one side of a boundary: ``encode_forward``/``decode_forward``,
  ``encode_backward``/``decode_backward`` producing/consuming :class:`CodecMessage`.
- :class:`CompressedBoundary` -- both sides in one process as an autograd function.
"""

from swarm.compression.boundary import BoundaryStats, CompressedBoundary, boundary_seed
from swarm.compression.codec import BoundaryCodec
from swarm.compression.message import CodecMessage
from swarm.compression.spec import CodecSpec, parse_codec_spec
from swarm.compression.state import (
    MemmapStore,
    RamStore,
    RowStore,
    StaleStateError,
    dataset_key,
    key_fingerprint,
    make_store,
)
from swarm.compression.wire import EncodedTensor, decode_tensor, encode_tensor

__all__ = [
    "BoundaryCodec",
    "BoundaryStats",
    "CodecMessage",
    "CodecSpec",
    "CompressedBoundary",
    "EncodedTensor",
    "MemmapStore",
    "RamStore",
    "RowStore",
    "StaleStateError",
    "boundary_seed",
    "dataset_key",
    "decode_tensor",
    "encode_tensor",
    "key_fingerprint",
    "make_store",
    "parse_codec_spec",
]
