"""Hidden-state codecs for the link to the next stage: ``none`` (raw) or ``int8``.

``int8``: per-row absmax scaling to signed 8-bit (direct quantization, DESIGN.md 4: inference
uses direct 8-bit, not AQ-SGD). Payload = N*H int8 bytes; meta = N float32 scales.
"""

from __future__ import annotations

import numpy as np
import torch

from swarm.errors import InvalidRequestError

CODECS = ("none", "int8")


def check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise InvalidRequestError(f"hidden codec {codec!r} unknown; use one of {CODECS}")
    return codec


def int8_encode(x: torch.Tensor) -> tuple[bytes, bytes]:
    """(payload, meta) for a (N, H) float tensor."""
    if x.dim() != 2:
        raise ValueError("int8_encode takes (N, H)")
    xf = x.detach().float().cpu()
    scale = xf.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (N,)
    q = torch.round(xf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.numpy().tobytes(), scale.numpy().astype("<f4").tobytes()


def int8_decode(payload: bytes, meta: bytes, shape: tuple[int, int]) -> torch.Tensor:
    """Float32 (N, H) from :func:`int8_encode`'s output; checks every size."""
    n, h = shape
    if len(payload) != n * h or len(meta) != 4 * n:
        raise InvalidRequestError(
            f"int8 hidden payload of {len(payload)} bytes / {len(meta)} scale bytes does not fit shape {shape}"
        )
    q = torch.from_numpy(np.frombuffer(payload, dtype=np.int8).copy()).reshape(n, h)
    scale = torch.from_numpy(np.frombuffer(meta, dtype="<f4").copy())
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise InvalidRequestError("int8 hidden scales must be finite and >= 0")
    return q.float() * scale[:, None]
