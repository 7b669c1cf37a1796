"""Commitments of a KV hand-off (disaggregated serving): both ends of a push commit to what moved.

Why: a decode chain's caches begin with KV a prefill node pushed. Without a record of what was
pushed, a decode stage whose output a spot check finds wrong (from a right input) could be the
pusher's fault or its own, so nobody could be blamed, and a node lying only on pushed caches was
never quarantined (docs/security.md, Known gaps).

Protocol (node/inference/kv_handoff.py, coordinator/inference/disagg.py):

- The prefill stage exports the session's cache, a tensor (layers, 2, kv_heads, positions,
  head_dim), and streams it to the decode stage (TLS, both ends named by the coordinator).
- The decode stage validates and takes it in, then answers with a **receipt** signed with its
  node identity (Ed25519; the coordinator holds the public key from registration): the model,
  the decode replica, the stage, the session, the positions, the coordinator's nonce for this
  hand-off, the SHA-256 of the tensor's bytes as received (:func:`kv_digest`) and a sketch of the
  tensor (:func:`kv_sketch`).
- The nonce (NONCE_BYTES random bytes, fresh for every hand-off, sent in the PushKV request and
  passed on by the prefill stage in the ImportKV stream) makes every receipt good for one
  hand-off: a prefill node handing the same session to the same decode node again (after a
  replay) cannot relay the decode node's receipt of the earlier hand-off while sending other
  bytes. Passing on another nonce only gets a receipt the coordinator refuses.
- The prefill stage answers the coordinator's PushKV with its own digest and sketch of what it
  sent, and the receipt relayed unchanged (it cannot forge the decode node's signature).
- The sketch's random projection is seeded by the digest: neither end knows the projection
  before the bytes are fixed, and changing a byte changes it, so a wrong cache cannot be made to
  sketch like the right one (a projection known in advance has a null space to hide an error in).
- The coordinator (:func:`check_handoff`) accepts the hand-off only when the receipt is signed by
  the decode node, names what was asked, and both ends' digests and sketches agree; otherwise it
  failed (the session is prefilled again on the decode chain, nothing is lost) and neither node
  is blamed: one of the two lies, and which one cannot be told.
- An accepted hand-off leaves a :class:`PushedKV` on the session for that decode chain. When a
  spot check finds a decode stage's output wrong from a right input, the referee recomputes the
  stage's KV of the pushed positions from the checkpoint and sketches it with the same seed
  (swarm/inference/verify.py ``judge``): within TOLERANCE, the pushed cache was right and the
  decode node is to blame; beyond it, the prefill node pushed a wrong cache it committed to, and
  it is to blame.

Pure apart from torch and the signature check.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import torch

from swarm.errors import AuthError, InvalidRequestError
from swarm.identity import verify as verify_signature
from swarm.inference.verify import SKETCH_DIM, PushedKV, distance  # noqa: F401 -- PushedKV: its record
from swarm.transport import tensors as wire

RECEIPT_VERSION = "swarm-kv-receipt-v2"  # v2: the coordinator's hand-off nonce is signed in
DIGEST_BYTES = 32
NONCE_BYTES = 16
# Both ends sketch the same bytes with the same seed; they differ only by the arithmetic of their
# devices (float32 sums in another order: ~1e-6 relative), never by this much.
SKETCH_AGREEMENT = 1e-3


def payload_digest(payload: bytes) -> bytes:
    """SHA-256 of a cache's bytes as they travel (swarm/transport/kv.py: raw, little-endian)."""
    return hashlib.sha256(payload).digest()


def kv_digest(kv: torch.Tensor) -> bytes:
    """:func:`payload_digest` of ``kv`` encoded for the wire."""
    return payload_digest(wire.raw_encode(kv))


def _seed(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def kv_sketch(kv: torch.Tensor, digest: bytes) -> tuple[float, ...]:
    """SKETCH_DIM values: output j is sum_t W[t, j] (x_t . P[:, j]) over the positions t of the
    cache (x_t: every layer's K and V of position t), with W and P Gaussian from a generator seeded
    by ``digest``. Linear, and E ||sketch(A) - sketch(B)||^2 = ||A - B||^2, so
    :func:`swarm.inference.verify.distance` of two sketches estimates the relative L2 distance of
    two caches; each output weighs every position independently, so an error confined to one
    position is not lost to one small weight. Computed in float32 on the tensor's device."""
    if kv.dim() != 5 or kv.shape[3] < 1:
        raise InvalidRequestError(f"a KV cache is (layers, 2, kv_heads, positions, head_dim), got {tuple(kv.shape)}")
    n = int(kv.shape[3])
    x = kv.detach().float().permute(3, 0, 1, 2, 4).reshape(n, -1)  # (positions, D)
    g = torch.Generator().manual_seed(_seed(digest))
    proj = torch.randn(x.shape[1], SKETCH_DIM, generator=g) / math.sqrt(SKETCH_DIM)
    weights = torch.randn(n, SKETCH_DIM, generator=g)
    s = ((x @ proj.to(x.device)) * weights.to(x.device)).sum(dim=0)
    return tuple(float(v) for v in s.cpu())


def check_nonce(nonce: bytes) -> bytes:
    """A hand-off nonce as it arrived from the network: exactly NONCE_BYTES, else InvalidRequestError."""
    if len(nonce) != NONCE_BYTES:
        raise InvalidRequestError(f"a KV hand-off needs the coordinator's nonce of {NONCE_BYTES} bytes, got "
                                  f"{len(nonce)}; update the node that sent it (swarm-node)")
    return nonce


def receipt_payload(*, model: str, replica: int, stage: int, session_id: str, positions: int, nonce: bytes,
                    digest: bytes, sketch: tuple[float, ...]) -> bytes:
    """The bytes a decode node signs: what it took in, for which assignment, session and hand-off."""
    head = json.dumps([RECEIPT_VERSION, model, int(replica), int(stage), session_id, int(positions), nonce.hex(),
                       digest.hex()], separators=(",", ":")).encode()
    return head + b"\0" + struct.pack(f"<{len(sketch)}f", *sketch)


class HandoffMismatch(Exception):
    """The two ends of a hand-off do not agree on what moved (or the receipt is not the decode
    node's): one of them lies, or is broken. The hand-off is treated as failed."""


def check_handoff(*, model: str, decode_replica: int, stage: int, session_id: str, positions: int, nonce: bytes,
                  prefill_node: str, decode_node: str, decode_public_key: bytes, sent_digest: bytes,
                  sent_sketch, receipt_digest: bytes, receipt_sketch, receipt_positions: int,
                  signature: bytes) -> PushedKV:
    """The coordinator's check of one stage's hand-off (the fields of a PushKV reply); returns its
    record, or raises HandoffMismatch saying what disagrees. ``nonce``: the one this hand-off's
    PushKV request carried (a receipt signed for another is refused)."""
    sent_sketch, receipt_sketch = tuple(float(v) for v in sent_sketch), tuple(float(v) for v in receipt_sketch)
    who = f"KV hand-off of stage {stage} ({prefill_node[:12]} -> {decode_node[:12]})"
    if len(receipt_digest) != DIGEST_BYTES or len(receipt_sketch) != SKETCH_DIM or not signature:
        raise HandoffMismatch(f"{who}: no receipt from the decode node (an older node, or the prefill node dropped it)")
    if receipt_positions != positions:
        raise HandoffMismatch(f"{who}: the receipt is for {receipt_positions} positions, {positions} were pushed")
    payload = receipt_payload(model=model, replica=decode_replica, stage=stage, session_id=session_id,
                              positions=positions, nonce=nonce, digest=receipt_digest, sketch=receipt_sketch)
    try:
        signer = verify_signature(decode_public_key, signature, payload)
    except AuthError as exc:
        raise HandoffMismatch(f"{who}: the receipt is not signed by the decode node for this hand-off (an "
                              f"earlier hand-off's receipt, or not the decode node's: {exc})") from exc
    if signer != decode_node:
        raise HandoffMismatch(f"{who}: the receipt is signed by {signer[:12]}, not the decode node")
    if len(sent_digest) != DIGEST_BYTES or len(sent_sketch) != SKETCH_DIM:
        raise HandoffMismatch(f"{who}: the prefill node committed to no digest and sketch")
    if sent_digest != receipt_digest:
        raise HandoffMismatch(f"{who}: the two ends name different bytes (digests differ)")
    d = distance(receipt_sketch, sent_sketch)
    if not d <= SKETCH_AGREEMENT:
        raise HandoffMismatch(f"{who}: the two ends' sketches of the same bytes differ ({d:.3g} relative L2)")
    return PushedKV(stage=stage, prefill_node=prefill_node, decode_node=decode_node, positions=positions,
                    digest=receipt_digest, sketch=receipt_sketch)
