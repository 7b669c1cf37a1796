"""One side of a pipeline boundary: encode/decode activations forward and gradients backward.

Protocol at the boundary between stage s (upstream, the *sender* of activations) and s+1:

1. s calls ``encode_forward(a, ids)`` and ships ``msg.to_bytes()``; s+1 parses it with
   ``CodecMessage.from_bytes`` and calls ``decode_forward(msg, ids)`` to get its input.
2. s+1 calls ``encode_backward(grad_of_input, ids)``; s calls ``decode_backward(msg, ids)``.

For ``aqsgd`` each side owns a :class:`~swarm.compression.state.RowStore` of m(x) per sample;
both apply the same bytes with the same function (:func:`_apply_forward`), so the two stores stay
bit-identical. A sample's first visit travels uncompressed (``first=raw``) or directly quantized
(``first=<bits>``); later visits carry Q(a - m) and both sides set m <- m + deq(Q(a - m)); the
receiver computes on m. Messages carry the state key's fingerprint; a message for another key, a
delta for a sample the receiver has not seen, or any malformed field raises InvalidRequestError
(``StaleStateError`` for key mismatches).

Determinism: the same inputs, spec, seed and backend produce the same bytes, so a distributed run
and the single-process simulation (:mod:`swarm.compression.boundary`) compute the same numbers.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from swarm.compression.message import BACKWARD, FORWARD, CodecMessage
from swarm.compression.spec import CodecSpec, parse_codec_spec
from swarm.compression.state import RowStore, StaleStateError, key_fingerprint
from swarm.compression.wire import EncodedTensor, decode_tensor, encode_tensor
from swarm.errors import InvalidRequestError

log = logging.getLogger(__name__)


class BoundaryCodec:
    """Encoder/decoder for one side of one boundary.

    ``key`` names the job and dataset (see :func:`~swarm.compression.state.dataset_key`); with
    ``aqsgd`` it must equal ``store.key``. ``store`` holds m(x) (required for aqsgd), ``ef_store``
    the backward error-feedback residuals (required with ``ef=1`` on the gradient-sending side).
    ``seed`` seeds stochastic rounding (default: the spec's); use a different seed per boundary.
    """

    def __init__(
        self,
        spec: CodecSpec | str,
        *,
        key: str,
        store: RowStore | None = None,
        ef_store: RowStore | None = None,
        device: torch.device | str = "cpu",
        seed: int | None = None,
        backend: str = "auto",
    ) -> None:
        self.spec = parse_codec_spec(spec)
        if not key:
            raise InvalidRequestError("a boundary codec needs a key naming the job and dataset")
        self.key = key
        self.fingerprint = key_fingerprint(key)
        self.device = torch.device(device)
        self.backend = backend
        if self.spec.kind == "aqsgd":
            if store is None:
                raise InvalidRequestError("an aqsgd codec needs a state store for m(x); see swarm.compression.make_store")
            if store.key != key:
                raise StaleStateError(f"state store is for key {store.key!r}, the codec for {key!r}; reset the state")
        self.store = store
        self.ef_store = ef_store
        self._seed = int(self.spec.seed if seed is None else seed)
        self._gens: dict[str, torch.Generator] = {}
        # aqsgd, set by a spot-checked worker (node/training/spotcheck.py): each encode_forward
        # keeps what its receiver computes on and m(x) before it, in ``last_sent``, as
        # (message, float32 reconstruction, m(x) rows of the message's samples before it, seen flags)
        self.keep_sent = False
        self.last_sent: tuple | None = None

    # -- forward: activations ------------------------------------------------------------------
    def encode_forward(self, activation: torch.Tensor, sample_ids) -> CodecMessage:
        """Encode a micro-batch (B, ...) of activations; updates this side's state (aqsgd)."""
        activation = activation.detach()
        ids = _ids(sample_ids, activation.shape[0])
        spec = self.spec
        if spec.kind != "aqsgd":
            part = self._enc(activation, spec.fw_bits, spec.fw_stochastic)
            return CodecMessage(
                kind=spec.kind, direction=FORWARD, key_fingerprint=self.fingerprint,
                sample_ids=tuple(ids.tolist()), delta_mask=(False,) * len(ids), fresh=part,
            )
        ids = self.store.check_ids(ids)
        self._check_rows(activation)
        seen = self.store.seen(ids)
        fresh_idx, delta_idx = (~seen).nonzero().view(-1), seen.nonzero().view(-1)
        before = self.store.read(ids, activation.device) if self.keep_sent else None
        fresh = delta = None
        if len(fresh_idx):
            fresh = self._enc(activation[fresh_idx.to(activation.device)], spec.first_bits, spec.fw_stochastic)
        if len(delta_idx):
            didx = delta_idx.to(activation.device)
            m = (before[didx] if before is not None else self.store.read(ids[delta_idx], activation.device)).float()
            change = activation[didx].float() - m  # a - m(x)
            delta = self._enc(change, spec.fw_bits, spec.fw_stochastic)
        msg = CodecMessage(
            kind="aqsgd", direction=FORWARD, key_fingerprint=self.fingerprint,
            sample_ids=tuple(ids.tolist()), delta_mask=tuple(seen.tolist()), fresh=fresh, delta=delta,
        )
        # the receiver's reconstruction is this very call's (float32 as it decodes: tensor_io.py)
        sent = _apply_forward(self.store, msg, ids, activation.device,
                              torch.float32 if self.keep_sent else torch.float16, self.backend, before=before)
        self.last_sent = (msg, sent, before, seen) if self.keep_sent else None
        return msg

    def decode_forward(
        self, msg: CodecMessage, sample_ids=None, *, dtype: torch.dtype | None = None,
        expected_row_shape: tuple[int, ...] | None = None, keep: dict | None = None,
    ) -> torch.Tensor:
        """The activations (B, ...) the downstream stage computes on; updates state (aqsgd).

        ``sample_ids`` (the micro-batch the receiver expects) must match the message's when given.
        ``keep`` (aqsgd, a spot-checked receiver: node/training/spotcheck.py): a dict that gets the
        message's m(x) rows before it (``rows``, on this codec's device) and their ``seen`` flags.
        """
        ids = self._check_msg(msg, FORWARD, sample_ids)
        if expected_row_shape is not None:
            for part in (msg.fresh, msg.delta):
                if part is not None and tuple(part.shape[1:]) != tuple(expected_row_shape):
                    raise InvalidRequestError(
                        f"activation rows of shape {tuple(part.shape[1:])} do not match the expected {tuple(expected_row_shape)}"
                    )
        if self.spec.kind != "aqsgd":
            self._check_bits(msg.fresh, self.spec.fw_bits, "forward")
            return decode_tensor(msg.fresh, dtype=dtype, device=self.device, backend=self.backend)
        ids = self.store.check_ids(ids)
        self._check_bits(msg.fresh, self.spec.first_bits, "first-visit")
        self._check_bits(msg.delta, self.spec.fw_bits, "forward")
        for part in (msg.fresh, msg.delta):
            if part is not None and tuple(part.shape[1:]) != self.store.row_shape:
                raise InvalidRequestError(
                    f"activation rows of shape {tuple(part.shape[1:])} do not match the state's {self.store.row_shape}"
                )
        seen = self.store.seen(ids)
        mask = torch.tensor(msg.delta_mask, dtype=torch.bool)
        if bool((mask & ~seen).any()):
            bad = ids[mask & ~seen][:4].tolist()
            raise StaleStateError(
                f"sender sent changes for samples {bad} this receiver has never seen: the two sides' states "
                "are out of sync; reset both boundary states"
            )
        out_dtype = dtype or (msg.fresh.dtype if msg.fresh is not None else msg.delta.dtype)
        before = None
        if keep is not None:
            keep["rows"] = before = self.store.read(ids, self.device)
            keep["seen"] = seen
        return _apply_forward(self.store, msg, ids, self.device, out_dtype, self.backend, before=before)

    # -- backward: gradients -------------------------------------------------------------------
    def encode_backward(self, grad: torch.Tensor, sample_ids) -> CodecMessage:
        """Encode the gradient w.r.t. this stage's input (B, ...); ``ef=1`` keeps residuals."""
        grad = grad.detach()
        ids = _ids(sample_ids, grad.shape[0])
        spec = self.spec
        if spec.error_feedback:
            if self.ef_store is None:
                raise InvalidRequestError("ef=1 needs an ef_store on the gradient-sending side")
            ids = self.ef_store.check_ids(ids)
            seen = self.ef_store.seen(ids).to(grad.device)
            e = self.ef_store.read(ids, grad.device).float()
            target = grad.float() + torch.where(seen.view(-1, *([1] * (grad.dim() - 1))), e, torch.zeros_like(e))
            part = self._enc(target, spec.bw_bits, spec.bw_stochastic, dtype=grad.dtype)
            residual = target - decode_tensor(part, dtype=torch.float32, backend=self.backend)
            self.ef_store.write(ids, residual)
        else:
            part = self._enc(grad, spec.bw_bits, spec.bw_stochastic)
        return CodecMessage(
            kind=spec.kind, direction=BACKWARD, key_fingerprint=self.fingerprint,
            sample_ids=tuple(ids.tolist()), delta_mask=(False,) * len(ids), fresh=part,
        )

    def decode_backward(
        self, msg: CodecMessage, sample_ids=None, *, dtype: torch.dtype | None = None,
        expected_shape: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """The gradient w.r.t. the activations this side sent."""
        self._check_msg(msg, BACKWARD, sample_ids)
        if any(msg.delta_mask):
            raise InvalidRequestError("gradient messages carry no delta rows")
        self._check_bits(msg.fresh, self.spec.bw_bits, "backward")
        if expected_shape is not None and tuple(msg.fresh.shape) != tuple(expected_shape):
            raise InvalidRequestError(f"gradient of shape {tuple(msg.fresh.shape)} does not match the sent activation {tuple(expected_shape)}")
        return decode_tensor(msg.fresh, dtype=dtype, device=self.device, backend=self.backend)

    # -- helpers ---------------------------------------------------------------------------------
    def _enc(self, x: torch.Tensor, bits: int | None, stochastic: bool, dtype: torch.dtype | None = None) -> EncodedTensor:
        if dtype is not None and bits is None:
            x = x.to(dtype)
        enc = encode_tensor(
            x, bits=bits, group_size=self.spec.group_size, per_channel=self.spec.per_channel,
            stochastic=stochastic and bits is not None, generator=self._generator(x.device), backend=self.backend,
        )
        if dtype is not None and enc.dtype != dtype:  # quantized from float32, decodes to the gradient's dtype
            enc = dataclasses.replace(enc, dtype=dtype)
        return enc

    def _generator(self, device: torch.device) -> torch.Generator:
        """A seeded generator per device (CPU and CUDA streams differ; each is deterministic)."""
        key = str(device)
        if key not in self._gens:
            self._gens[key] = torch.Generator(device=device).manual_seed(self._seed)
        return self._gens[key]

    def _check_rows(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.store.row_shape:
            raise InvalidRequestError(
                f"activation rows of shape {tuple(x.shape[1:])} do not match the boundary state's {self.store.row_shape}; "
                "AQ-SGD needs a fixed sequence length"
            )

    def _check_msg(self, msg: CodecMessage, direction: str, sample_ids) -> torch.Tensor:
        if msg.direction != direction:
            raise InvalidRequestError(f"expected a {direction} message, got {msg.direction}")
        if msg.kind != self.spec.kind:
            raise InvalidRequestError(f"peer used codec {msg.kind!r}, this boundary is configured for {self.spec.kind!r}")
        if msg.key_fingerprint != self.fingerprint:
            raise StaleStateError(
                "message belongs to another job or dataset (key fingerprint mismatch); the peer holds stale "
                "state: restart the job's stages with the same data"
            )
        ids = torch.tensor(msg.sample_ids, dtype=torch.long)
        if sample_ids is not None and not torch.equal(ids, _ids(sample_ids, len(ids))):
            raise InvalidRequestError("message sample ids differ from the micro-batch this stage expects")
        return ids

    def _check_bits(self, part: EncodedTensor | None, bits: int | None, what: str) -> None:
        if part is None:
            return
        if part.bits != (bits or 0):
            raise InvalidRequestError(f"{what} part quantized at {part.bits} bits, the codec expects {bits or 'raw'}")
        if part.bits and part.per_channel != self.spec.per_channel:
            raise InvalidRequestError(f"{what} part uses {'per-channel' if part.per_channel else 'group'} scales, the codec the other")


def _ids(sample_ids, batch: int) -> torch.Tensor:
    ids = torch.as_tensor(sample_ids, dtype=torch.long).reshape(-1).cpu()
    if ids.numel() != batch:
        raise InvalidRequestError(f"{ids.numel()} sample ids for a micro-batch of {batch}")
    return ids


def _apply_forward(
    store: RowStore, msg: CodecMessage, ids: torch.Tensor, device: torch.device, dtype: torch.dtype, backend: str,
    before: torch.Tensor | None = None,
) -> torch.Tensor:
    """Update m(x) from a forward message and return the reconstruction (B, ...) in ``dtype``.

    Sender and receiver both call this with the same message: fresh rows set m = decoded value,
    delta rows set m = fp16(m + decoded change). The reconstruction is the decoded value for fresh
    rows (full precision) and m for delta rows. ``before``: m(x) of all of ``ids`` already read
    (on ``device``), so the delta rows are not read again.
    """
    mask = torch.tensor(msg.delta_mask, dtype=torch.bool)
    row_shape = (msg.fresh or msg.delta).shape[1:]
    out = torch.empty((len(ids), *row_shape), dtype=dtype, device=device)
    if msg.fresh is not None:
        fidx = (~mask).nonzero().view(-1)
        value = decode_tensor(msg.fresh, device=device, backend=backend)
        store.write(ids[fidx], value.to(torch.float16))
        out[fidx.to(device)] = value.to(dtype)
    if msg.delta is not None:
        didx = mask.nonzero().view(-1)
        on_device = didx.to(device)
        change = decode_tensor(msg.delta, dtype=torch.float32, device=device, backend=backend)
        m = (before[on_device] if before is not None else store.read(ids[didx], device)).float()
        m = (m + change).to(torch.float16)
        store.write(ids[didx], m)
        out[on_device] = m.to(dtype)
    return out
