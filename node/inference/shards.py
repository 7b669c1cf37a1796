"""Validation of stage assignments, fetching a stage's shard, and the shard helpers re-exported
for the servicer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from swarm.errors import InvalidRequestError, NotFoundError, PeerError
from swarm.identity import is_node_id
from swarm.proto.v1 import inference_pb2 as pb
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.transport.channels import data_channel, parse_address
from swarm.transport.errors import error_from_rpc
from swarm.transport.inference_shards import receive_shard, serve_shard

__all__ = ["fetch_shard", "receive_shard", "safe_dir", "same_weights", "serve_shard", "validate_assignment"]

log = logging.getLogger(__name__)

MAX_SEQ_LEN = 1 << 17
MAX_SESSIONS = 4096


def validate_assignment(a: pb.ServeStageAssignment) -> None:
    """Raise InvalidRequestError naming the first bad field of an assignment."""
    if not a.model_name or len(a.model_name) > 128:
        raise InvalidRequestError("assignment needs a model name of 1..128 characters")
    if not a.model_digest or len(a.model_digest) > 128:
        raise InvalidRequestError("assignment needs the model digest")
    if not 0 <= a.stage < a.num_stages <= 1024 or a.replica < 0:
        raise InvalidRequestError(f"assignment stage {a.stage} of {a.num_stages} (replica {a.replica}) is invalid")
    if not 0 <= a.first_layer < a.last_layer_excl:
        raise InvalidRequestError(f"assignment layer range [{a.first_layer}, {a.last_layer_excl}) is empty or invalid")
    if a.stage == 0 and a.first_layer != 0:
        raise InvalidRequestError("the first stage must start at layer 0")
    if not 1 <= a.max_seq_len <= MAX_SEQ_LEN or not 1 <= a.max_sessions <= MAX_SESSIONS:
        raise InvalidRequestError("assignment max_seq_len / max_sessions out of range")
    if a.session_timeout_s < 0 or a.session_timeout_s > 86400:
        raise InvalidRequestError("session_timeout_s must be in 0..86400")
    if a.stage < a.num_stages - 1:
        parse_address(a.next_address)
    elif a.next_address:
        raise InvalidRequestError("the last stage has no next address")
    if a.hidden_codec not in ("", "none", "int8"):
        raise InvalidRequestError(f"hidden codec {a.hidden_codec!r} unknown; use none or int8")
    if len(a.kv_source_node_ids) > 64 or not all(0 < len(n) <= 128 for n in a.kv_source_node_ids):
        raise InvalidRequestError("assignment kv_source_node_ids: at most 64 node ids of 1..128 characters")
    for src in a.shard_sources:
        if src != "coordinator":
            parse_address(src)
    if a.shard_source_node_ids and (len(a.shard_source_node_ids) != len(a.shard_sources) or not all(
            i == "" or is_node_id(i) for i in a.shard_source_node_ids)):
        raise InvalidRequestError("shard_source_node_ids must name a node id (or '') for each shard source")


def fetch_shard(req: pb.ServeFetchShardRequest, sources: list[str], shard_dir: Path, *,
                open_coordinator_shard: Callable[[pb.ServeFetchShardRequest], Iterator[pb.ServeShardChunk]],
                security, traffic=None, node_ids: list[str] = ()) -> int:
    """Fetch the tensors ``req`` names into ``shard_dir`` from the first source that has them
    ("coordinator" or a peer's host:port, at most 8 tried); returns the bytes received. Raises
    PeerError naming every source's failure. ``node_ids`` (parallel to ``sources``, may be
    empty): the node each peer source must prove to be, and the name a relay routes by
    (swarm/transport/relay.py)."""
    errors = []
    for i, src in enumerate(sources[:8]):
        try:
            if src == "coordinator":
                return receive_shard(open_coordinator_shard(req), shard_dir)
            node_id = node_ids[i] if i < len(node_ids) and node_ids[i] else None
            with data_channel(src, security=security, node_id=node_id) as ch:
                nbytes = receive_shard(pb_grpc.InferenceStageStub(ch).FetchShard(req, timeout=600), shard_dir)
            if traffic is not None:
                traffic.add_received(nbytes)
            return nbytes
        except grpc.RpcError as exc:
            errors.append(f"{src}: {error_from_rpc(exc, src)}")
        except (InvalidRequestError, NotFoundError, OSError) as exc:
            errors.append(f"{src}: {exc}")
        log.warning("shard fetch failed source=%s error=%s", src, errors[-1])
    raise PeerError(f"could not fetch layers [{req.first_layer}, {req.last_layer_excl}) from any source: {errors}")


def same_weights(old: pb.ServeStageAssignment, new: pb.ServeStageAssignment) -> bool:
    """Whether ``new`` runs the very stage ``old`` loaded (weights, role and runtime sizes)."""
    key = lambda a: (a.model_digest, a.first_layer, a.last_layer_excl, a.stage == 0, a.stage == a.num_stages - 1,  # noqa: E731
                     a.dtype, a.max_seq_len, a.max_sessions, a.session_timeout_s)
    return key(old) == key(new)


def safe_dir(name: str) -> str:
    """A model name as one directory name (at most 64 characters)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64] or "model"
