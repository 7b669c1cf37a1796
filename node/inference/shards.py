"""Validation of stage assignments, and the shard helpers re-exported for the servicer."""

from __future__ import annotations

from swarm.errors import InvalidRequestError
from swarm.identity import is_node_id
from swarm.proto.v1 import inference_pb2 as pb
from swarm.transport.channels import parse_address
from swarm.transport.inference_shards import receive_shard, serve_shard

__all__ = ["receive_shard", "serve_shard", "validate_assignment"]

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
    for src in a.shard_sources:
        if src != "coordinator":
            parse_address(src)
    if a.shard_source_node_ids and (len(a.shard_source_node_ids) != len(a.shard_sources) or not all(
            i == "" or is_node_id(i) for i in a.shard_source_node_ids)):
        raise InvalidRequestError("shard_source_node_ids must name a node id (or '') for each shard source")
