"""A stage's side of disaggregated serving: push a prefilled session's KV cache to the matching
stage of a decode chain, and take one in (coordinator/inference/disagg.py has the protocol).

- ``PushKV`` (from the coordinator only, with the prefill chain's step capability): this stage
  exports the session's cache, checks it holds the ``num_positions`` the coordinator expects,
  streams it (swarm/transport/kv.py) to ``target`` over the TLS peer channel (the certificate
  must name ``target.node_id``) with the decode chain's capability, then frees its copy.
- ``ImportKV`` (from a node only): the caller, from its TLS certificate, must be one of the
  ``kv_source_node_ids`` the coordinator put in this stage's assignment, and the tensor's
  sender id must be that caller; the decode chain's capability is checked as for a step; shape,
  dtype, positions, stage, replica and size must be what this stage holds. The session then
  exists here at ``positions``: its next step is a one-token decode.
- Both ends commit to what moved (swarm/inference/kv_receipt.py): the decode stage answers with a
  receipt it signs (digest and sketch of what it took in, and the coordinator's nonce for this
  hand-off, which the prefill stage passes on in the stream's first message), and the prefill
  stage answers the coordinator with its own digest and sketch of what it sent and the receipt,
  relayed unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import torch

from swarm.errors import InvalidRequestError, PermissionDeniedError
from swarm.inference.kv_receipt import check_nonce, kv_sketch, payload_digest, receipt_payload
from swarm.inference.stage_runtime import StageRuntime
from swarm.proto.v1 import inference_pb2 as pb
from swarm.transport import tensors as wire
from swarm.transport.errors import error_from_rpc
from swarm.transport.inference import step_metadata
from swarm.transport.kv import KVExpectation, kv_from_chunks, kv_to_chunks

PUSH_TIMEOUT_S = 120.0


def push_kv(runtime: StageRuntime, a: pb.ServeStageAssignment, request: pb.ServePushKVRequest, *, node_id: str,
            peers, alter: Callable[[torch.Tensor], torch.Tensor] | None = None) -> pb.ServePushKVReply:
    """Send the session's cache to ``request.target`` (``peers``: node/inference/routing.PeerStubs);
    returns the reply for the coordinator: payload bytes sent, this end's commitment to them and
    the decode stage's receipt. ``alter``: SWARM_FAULT corrupt-kv (tests). Raises
    InvalidRequestError / NotFoundError / PeerError."""
    t = request.target
    if not (0 <= t.replica < 1 << 20 and 0 < len(t.node_id) <= 128 and 0 < len(t.address) <= 256
            and 0 < len(t.capability) <= 256) or t.node_id == node_id:
        raise InvalidRequestError("PushKV target is malformed (replica, node id, address, capability) or this node")
    nonce = check_nonce(request.handoff_nonce)
    kv, n = runtime.export_kv(request.session_id[:200])
    if n != request.num_positions:
        raise InvalidRequestError(f"session {request.session_id[:40]} holds {n} positions on this stage, the "
                                  f"coordinator expects {request.num_positions}; replay it")
    if alter is not None:
        kv = alter(kv)
    payload = wire.raw_encode(kv)  # the bytes that travel (on the host), hashed once and sent
    digest = payload_digest(payload)
    sketch = kv_sketch(kv, digest)  # on the stage's device
    chunks = kv_to_chunks(kv, session_id=request.session_id, model_name=a.model_name, stage=a.stage,
                          replica=t.replica, sender_id=node_id, payload=payload, nonce=nonce)
    try:
        reply = peers.get(t.node_id, t.address).stub.ImportKV(chunks, timeout=PUSH_TIMEOUT_S,
                                                              metadata=step_metadata(t.capability))
    except grpc.RpcError as exc:
        raise error_from_rpc(exc, f"decode stage {a.stage} ({t.node_id[:12]} at {t.address})") from exc
    runtime.close([request.session_id])
    return pb.ServePushKVReply(kv_bytes=int(reply.kv_bytes), sent_digest=digest, sent_sketch=sketch,
                               receipt=reply.receipt)


def import_kv(runtime: StageRuntime, a: pb.ServeStageAssignment, first: pb.ServeKVChunk, rest, *,
              caller: str | None, sign: Callable[[bytes], bytes] | None = None) -> pb.ServeImportKVReply:
    """Take a session's cache from an ImportKV stream; returns its payload bytes and the receipt,
    signed with ``sign`` (the node identity's; None only in tests without a coordinator: unsigned).
    ``caller``: the sender from its TLS certificate (None only in tests without a coordinator)."""
    sources = frozenset(a.kv_source_node_ids)
    if caller is not None and caller not in sources:
        raise PermissionDeniedError(
            f"node {caller[:12]} may not send KV caches to model {a.model_name!r} replica {a.replica} stage "
            f"{a.stage}: the coordinator named {len(sources)} prefill node(s) for it")
    expect = KVExpectation(stage=a.stage, replica=a.replica, dtype=wire.dtype_name(runtime.dtype),
                           senders=frozenset({caller}) if caller is not None else sources,
                           max_positions=runtime.max_seq_len, shape=runtime.kv_shape)
    nonce = check_nonce(first.handoff_nonce)
    session_id, kv, received = kv_from_chunks(first, rest, expect)
    runtime.import_kv(session_id, kv)
    digest = payload_digest(received)
    sketch = kv_sketch(kv, digest)  # of the decoded copy, on the host
    n = int(kv.shape[3])
    payload = receipt_payload(model=a.model_name, replica=a.replica, stage=a.stage, session_id=session_id,
                              positions=n, nonce=nonce, digest=digest, sketch=sketch)
    receipt = pb.ServeKVReceipt(digest=digest, sketch=sketch, positions=n, signature=sign(payload) if sign else b"")
    return pb.ServeImportKVReply(kv_bytes=kv.numel() * kv.element_size(), receipt=receipt)
