"""What a boundary's receiver computes on, seen from outside the boundary: the spot checks of
compressed training jobs (node/training/spotcheck.py) are built on these.

A checker recomputes a stage's output ``a'`` and must compare it with what that stage *sent*,
which the next stage only knows decoded: with a lossy codec the two differ by the codec's
rounding, not only by float noise. The checker *replays an honest sender*: it encodes ``a'``
the way a sender with the same state would (for AQ-SGD against the receiver's m(x) before the
message, the *reference*, which the receiver reads from its state just before decoding) and
decodes it. How far that lands from ``a'`` is the rounding error an honest message of this very
sample shows, and the checker allows it, twice, on top of its lossless tolerance:
``||decoded - a'|| <= (tol + 2 * ||replay - a'|| / ||a'||) * ||a'||``.

Why not compare the decoded value with the replay exactly: round-to-nearest is deterministic, but
the checker's ``a'`` is the checked stage's ``a`` only up to float noise and the weights'
distance (checks are weighed up to 3e-3 apart), and an AQ-SGD change is small, so its code steps
are too: measured on the 2 x 2 test job at ``fw=2``, values crossing a rounding boundary put an
honest replay 0.095 (relative L2) from the decoded output. Per value the decoded output is within
half a code step of the true ``a``, so within that plus the noise of ``a'``: the bound above.

Gradients (:func:`honest_backward`) the same way; stochastic rounding (the backward default)
draws from the checker's own generator: one honest encoding, not the sender's. Gradients sent
with error feedback (``ef=1``) carry the sample's previous residual, which only the sender holds:
they are not checked (:func:`gradient_checkable`).

:func:`sent_forward` and :func:`sent_backward` give a sender's view of what its receiver computes
on, from its own message and state, changing nothing: the witnesses send those.
"""

from __future__ import annotations

import torch

from swarm.compression.codec import BoundaryCodec
from swarm.compression.message import CodecMessage
from swarm.compression.spec import CodecSpec
from swarm.compression.state import RamStore
from swarm.compression.wire import decode_tensor, encode_tensor

_KEY = "spot-check replay"  # the throwaway state's key: never on the wire


def sent_forward(codec: BoundaryCodec, msg: CodecMessage, sample_ids) -> torch.Tensor:
    """After ``codec.encode_forward(a, ids)`` returned ``msg``: the float32 activations its
    receiver computes on (decoded fresh rows, m(x) of delta rows), read from this side's state."""
    if codec.spec.kind != "aqsgd":
        return decode_tensor(msg.fresh, dtype=torch.float32, device=codec.device, backend=codec.backend)
    if codec.last_sent is not None and codec.last_sent[0] is msg:  # kept by the encode (codec.keep_sent)
        return codec.last_sent[1]
    ids = torch.as_tensor(sample_ids, dtype=torch.long).reshape(-1).cpu()
    mask = torch.tensor(msg.delta_mask, dtype=torch.bool)
    part = msg.fresh if msg.fresh is not None else msg.delta
    out = torch.empty((len(ids), *part.shape[1:]), dtype=torch.float32, device=codec.device)
    if msg.fresh is not None:
        out[(~mask).nonzero().view(-1).to(codec.device)] = decode_tensor(
            msg.fresh, dtype=torch.float32, device=codec.device, backend=codec.backend)
    if msg.delta is not None:
        didx = mask.nonzero().view(-1)
        out[didx.to(codec.device)] = codec.store.read(ids[didx], codec.device).float()
    return out


def sent_backward(codec: BoundaryCodec, msg: CodecMessage) -> torch.Tensor:
    """After ``codec.encode_backward`` returned ``msg``: the float32 gradient its receiver gets."""
    return decode_tensor(msg.fresh, dtype=torch.float32, device=codec.device, backend=codec.backend)


def honest_forward(spec: CodecSpec, activation: torch.Tensor, *, reference: torch.Tensor | None = None,
                   seen: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """What the receiver of an honest sender of ``activation`` (B, ...) computes on (float32).

    ``spec.kind`` none: the activation itself. direct: its decoded encoding. aqsgd: the rows
    ``seen`` (bool, (B,)) are deltas against ``reference`` (m(x) before the message, (B, ...)),
    the others first visits. Stochastic forward rounding draws from a fresh generator: one
    honest encoding, not the sender's."""
    a = activation.detach().float()
    if spec.kind == "none":
        return a
    codec = BoundaryCodec(spec, key=_KEY, store=None if spec.kind != "aqsgd" else
                          RamStore(key=_KEY, num_samples=a.shape[0], row_shape=tuple(a.shape[1:]), device=a.device),
                          device=a.device, backend=backend)
    ids = torch.arange(a.shape[0])
    if spec.kind == "aqsgd":
        if reference is None or seen is None or tuple(reference.shape) != tuple(a.shape) or seen.numel() != a.shape[0]:
            raise ValueError("an aqsgd replay needs the reference rows and the seen mask of every sample")
        seen = seen.reshape(-1).bool().cpu()
        if bool(seen.any()):
            codec.store.write(ids[seen], reference[seen.to(reference.device)].to(a.device))
    msg = codec.encode_forward(a, ids)
    return sent_forward(codec, msg, ids)


def honest_backward(spec: CodecSpec, grad: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """What the receiver of an honest sender of ``grad`` gets (float32): itself when raw, else
    one decoded encoding (stochastic rounding from the checker's own fixed-seed generator)."""
    g = grad.detach().float()
    if spec.kind == "none" or spec.bw_bits is None:
        return g
    gen = torch.Generator(device=g.device).manual_seed(0x51AC) if spec.bw_stochastic else None
    enc = encode_tensor(g, bits=spec.bw_bits, group_size=spec.group_size, per_channel=spec.per_channel,
                        stochastic=spec.bw_stochastic, generator=gen, backend=backend)
    return decode_tensor(enc, dtype=torch.float32, backend=backend)


def gradient_checkable(spec: CodecSpec) -> bool:
    """Whether a stage's sent gradients can be checked: not with error feedback (the residual it
    adds is the sender's alone)."""
    return not spec.error_feedback
