"""Signed step commitments: a stage's commitments reach the coordinator through the stages before
it, which must not be able to alter them unseen.

Why: a step's reply travels back from the last stage through every earlier stage, each adding its
own commitments (swarm/inference/verify.py). Unsigned, a stage relaying the reply could rewrite a
later stage's commitments (or the tokens) and a spot check would then blame that honest stage:
framing by relay.

Protocol (node/inference/step.py, coordinator/inference/replica.py):

- A step that asks commitments carries a fresh ``step_nonce`` (the coordinator's), forwarded
  unchanged to every stage.
- Each stage, once it made its own commitments, drops any commitment or signature in the reply
  coming back that claims its stage or an earlier one (a later stage cannot speak for it), appends
  its commitments and a :class:`ServeStageSignature` over :func:`stage_payload` (model, stage,
  nonce, its commitments in reply order and, on the last stage, the tokens):
  - ``mac``: HMAC-SHA256 with the stage's *commit key* (:func:`mac_stage`). The coordinator
    derives one key per (node, model, stage) from a secret of its own (:func:`derive_commit_key`)
    and hands it to that node alone, in the ConfirmAssignment reply of its authenticated call; no
    other node knows it, so a relaying stage can forge a MAC no better than a signature.
  - ``signature``: the node identity's Ed25519 signature (:func:`sign_stage`), for a stage that
    got no commit key (a coordinator older than commit keys; tests without a coordinator).
  Why a MAC: the coordinator is the only verifier, and a stage signs every step while checks can
  run. Measured on a 2-core CPU for one entry: Ed25519 signing 29 us and verifying ~125 us per
  stage, HMAC 1.6 us (docs/benchmarks.md, "Signed commitments ... what they cost").
- The coordinator (:func:`authentic_stages`) checks, for the steps whose commitments it weighs,
  each stage's MAC against the key it derives for that stage's node, or else its signature
  against the public key that node registered. A stage whose MAC or signature is missing or
  wrong has commitments nobody can vouch for: a relaying stage altered them or it sent none, and
  which cannot be told, so a check never blames on them (verify.py ``judge``).

Pure apart from the signature check.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Iterable, Sequence

from swarm.identity import verify as verify_signature
from swarm.proto.v1 import inference_pb2 as pb

PAYLOAD_VERSION = b"swarm-step-commit-v1"
NONCE_BYTES = 12
MAX_NONCE_BYTES = 64
COMMIT_KEY_BYTES = 32
_KEY_LABEL = b"swarm-commit-key-v1"


def derive_commit_key(secret: bytes, *, node_id: str, model: str, stage: int) -> bytes:
    """The commit key of ``node_id`` for ``stage`` of ``model`` under the coordinator's ``secret``."""
    msg = b"".join([_KEY_LABEL, _blob(node_id.encode()), _blob(model.encode()), struct.pack("<i", stage)])
    return hmac.new(secret, msg, hashlib.sha256).digest()


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()


def _blob(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


def stage_payload(*, model: str, stage: int, nonce: bytes, commitments: Iterable[pb.ServeCommitment],
                  tokens: Sequence[int] = ()) -> bytes:
    """The bytes stage ``stage`` signs: its commitments of one step, in the order they are in the
    reply (each as its deterministic protobuf encoding: what the coordinator parses re-encodes to
    the same bytes, and an added or changed field, known or not, does not), bound to the step by
    ``nonce``; the last stage adds the step's tokens."""
    parts = [PAYLOAD_VERSION, _blob(model.encode()), struct.pack("<i", stage), _blob(nonce)]
    parts += [_blob(c.SerializeToString(deterministic=True)) for c in commitments]
    parts.append(struct.pack(f"<I{len(tokens)}q", len(tokens), *tokens))
    return b"".join(parts)


def own_commitments(reply: pb.ServeStepReply, stage: int) -> list[pb.ServeCommitment]:
    """The commitments of ``stage`` in ``reply``, in order."""
    return [c for c in reply.commitments if c.stage == stage]


def keep_later(reply: pb.ServeStepReply, stage: int) -> None:
    """Drop from ``reply`` (coming back from the next stage) every commitment and signature that
    claims ``stage`` or an earlier one: only that stage itself may speak for it."""
    if any(c.stage <= stage for c in reply.commitments):
        later = [c for c in reply.commitments if c.stage > stage]
        del reply.commitments[:]
        reply.commitments.extend(later)
    if any(s.stage <= stage for s in reply.signatures):
        later_sigs = [s for s in reply.signatures if s.stage > stage]
        del reply.signatures[:]
        reply.signatures.extend(later_sigs)


def sign_stage(reply: pb.ServeStepReply, *, model: str, stage: int, nonce: bytes, last: bool,
               sign: Callable[[bytes], bytes]) -> None:
    """Append ``stage``'s signature over its commitments in ``reply`` (and the tokens when ``last``)."""
    payload = stage_payload(model=model, stage=stage, nonce=nonce, commitments=own_commitments(reply, stage),
                            tokens=list(reply.token_ids) if last else ())
    reply.signatures.append(pb.ServeStageSignature(stage=stage, signature=sign(payload)))


def mac_stage(reply: pb.ServeStepReply, *, model: str, stage: int, nonce: bytes, last: bool, key: bytes) -> None:
    """Append ``stage``'s MAC (its commit key) over its commitments in ``reply`` (and the tokens when ``last``)."""
    payload = stage_payload(model=model, stage=stage, nonce=nonce, commitments=own_commitments(reply, stage),
                            tokens=list(reply.token_ids) if last else ())
    reply.signatures.append(pb.ServeStageSignature(stage=stage, mac=_mac(key, payload)))


def authentic_stages(reply: pb.ServeStepReply, *, model: str, nonce: bytes, node_ids: Sequence[str],
                     public_key: Callable[[str], bytes],
                     commit_key: Callable[[str, int], bytes | None] | None = None) -> list[bool]:
    """Per stage of the chain (``node_ids`` in stage order): whether its commitments in ``reply``
    carry its node's MAC or signature for this step (the first entry naming the stage counts;
    ``commit_key(node_id, stage)`` the key the coordinator gave that node, None when it gave
    none; ``public_key(node_id)`` the key it registered, raising or returning b"" when unknown).
    A MAC counts only with the key; a signature always can (a node older than commit keys
    ignores the key it was given and signs, which no other node can forge either)."""
    sigs: dict[int, pb.ServeStageSignature] = {}
    for s in reply.signatures[: 4 * max(1, len(node_ids))]:
        sigs.setdefault(int(s.stage), s)
    out = []
    for k, node_id in enumerate(node_ids):
        sig = sigs.get(k)
        if sig is None or not (sig.mac or sig.signature):
            out.append(False)
            continue
        payload = stage_payload(model=model, stage=k, nonce=nonce, commitments=own_commitments(reply, k),
                                tokens=list(reply.token_ids) if k == len(node_ids) - 1 else ())
        key = commit_key(node_id, k) if commit_key is not None and sig.mac else None
        if key:
            out.append(hmac.compare_digest(bytes(sig.mac), _mac(key, payload)))
            continue
        try:
            out.append(bool(sig.signature) and verify_signature(public_key(node_id), bytes(sig.signature), payload) == node_id)
        except Exception:  # noqa: BLE001 -- a bad signature (AuthError), an unknown node: not vouched for
            out.append(False)
    return out
