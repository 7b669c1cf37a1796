"""Single-process simulation of a compressed pipeline boundary, as an autograd function.

``y = boundary(x, sample_ids)`` runs exactly what two stages do over the network: the upstream
:class:`BoundaryCodec` encodes x, the downstream one decodes it (optionally through the real
bytes), and in backward the downstream side encodes the gradient and the upstream side decodes
it. A whole model split by boundaries therefore trains in one process as if its stages were
on different machines, and gives the same numbers as the distributed runtime with the same codec
seeds (boundary i uses ``seed = spec.seed + i`` by convention, see :func:`boundary_seed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from swarm.compression.codec import BoundaryCodec
from swarm.compression.message import CodecMessage
from swarm.compression.spec import CodecSpec, parse_codec_spec
from swarm.compression.state import RowStore, make_store


def boundary_seed(spec: CodecSpec, boundary_index: int) -> int:
    """The stochastic-rounding seed of boundary ``boundary_index`` (0 = after stage 0)."""
    return spec.seed + boundary_index


@dataclass(slots=True)
class BoundaryStats:
    """Traffic and error of one boundary, accumulated since the last :meth:`reset`."""

    forward_bytes: int = 0
    backward_bytes: int = 0
    forward_messages: int = 0
    backward_messages: int = 0
    act_err_sq: float = 0.0
    act_norm_sq: float = 0.0
    grad_err_sq: float = 0.0
    grad_norm_sq: float = 0.0

    @property
    def act_rel_error(self) -> float:
        """||reconstruction - activation|| / ||activation|| over everything sent."""
        return math.sqrt(self.act_err_sq / self.act_norm_sq) if self.act_norm_sq else 0.0

    @property
    def grad_rel_error(self) -> float:
        return math.sqrt(self.grad_err_sq / self.grad_norm_sq) if self.grad_norm_sq else 0.0

    def reset(self) -> None:
        for f in self.__slots__:
            setattr(self, f, 0 if "bytes" in f or "messages" in f else 0.0)


class _BoundaryFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, boundary: "CompressedBoundary", ids: torch.Tensor):
        ctx.boundary, ctx.ids = boundary, ids
        return boundary._send_forward(x, ids)

    @staticmethod
    def backward(ctx, grad):
        return ctx.boundary._send_backward(grad, ctx.ids), None, None


class CompressedBoundary(nn.Module):
    """The link between stage i and i+1, simulated in-process with both sides' codecs.

    ``num_samples`` and ``row_shape`` size the AQ-SGD stores (aqsgd, and ``ef=1``); row_shape
    defaults to the first activation's rows. ``storage`` is "ram" or a directory (two memmap
    stores, ``up/`` and ``down/``, are made inside). With ``serialize`` every message goes
    through ``to_bytes``/``from_bytes`` (slower; proves the wire path). Calling with
    ``sample_ids=None`` passes x through untouched (evaluation: no state is changed).
    """

    def __init__(
        self,
        spec: CodecSpec | str,
        *,
        key: str,
        num_samples: int | None = None,
        row_shape: tuple[int, ...] | None = None,
        storage: str = "ram",
        device: torch.device | str = "cpu",
        seed: int | None = None,
        serialize: bool = False,
        measure_error: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.spec = parse_codec_spec(spec)
        self.key, self.num_samples, self.row_shape = key, num_samples, row_shape
        self.storage, self.device, self.seed = storage, torch.device(device), seed
        self.serialize, self.measure_error, self.backend = serialize, measure_error, backend
        self.stats = BoundaryStats()
        self.upstream: BoundaryCodec | None = None
        self.downstream: BoundaryCodec | None = None
        if row_shape is not None:
            self._build(tuple(row_shape))

    def _store(self, side: str, row_shape: tuple[int, ...]) -> RowStore:
        if self.num_samples is None:
            raise ValueError(f"codec {self.spec} keeps per-sample state: pass num_samples to CompressedBoundary")
        storage = self.storage if self.storage == "ram" else f"{self.storage}/{side}"
        return make_store(key=self.key, num_samples=self.num_samples, row_shape=row_shape, storage=storage, device=self.device, reset=True)

    def _build(self, row_shape: tuple[int, ...]) -> None:
        aq, ef = self.spec.kind == "aqsgd", self.spec.error_feedback
        common = dict(key=self.key, device=self.device, seed=self.seed, backend=self.backend)
        self.upstream = BoundaryCodec(self.spec, store=self._store("up", row_shape) if aq else None, **common)
        self.downstream = BoundaryCodec(
            self.spec, store=self._store("down", row_shape) if aq else None,
            ef_store=self._store("ef", row_shape) if ef else None, **common,
        )
        self.row_shape = row_shape

    def forward(self, x: torch.Tensor, sample_ids=None) -> torch.Tensor:
        if sample_ids is None:
            return x
        if self.upstream is None:
            self._build(tuple(x.shape[1:]))
        ids = torch.as_tensor(sample_ids, dtype=torch.long).reshape(-1).cpu()
        return _BoundaryFn.apply(x, self, ids)

    def _wire(self, msg: CodecMessage) -> CodecMessage:
        return CodecMessage.from_bytes(msg.to_bytes(), device=self.device) if self.serialize else msg

    def _send_forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        msg = self._wire(self.upstream.encode_forward(x, ids))
        y = self.downstream.decode_forward(msg, ids, dtype=x.dtype).to(x.device)
        self.stats.forward_bytes += msg.nbytes
        self.stats.forward_messages += 1
        if self.measure_error:
            self.stats.act_err_sq += float((y.float() - x.float()).pow(2).sum())
            self.stats.act_norm_sq += float(x.float().pow(2).sum())
        return y

    def _send_backward(self, grad: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        msg = self._wire(self.downstream.encode_backward(grad, ids))
        g = self.upstream.decode_backward(msg, ids, dtype=grad.dtype).to(grad.device)
        self.stats.backward_bytes += msg.nbytes
        self.stats.backward_messages += 1
        if self.measure_error:
            self.stats.grad_err_sq += float((g.float() - grad.float()).pow(2).sum())
            self.stats.grad_norm_sq += float(grad.float().pow(2).sum())
        return g
