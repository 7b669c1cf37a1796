"""A stage's side of per-request routes (coordinator/inference/routes.py): the next hop a step
names, channels to other chains' stages, the link a step goes on by (:func:`next_link`: the step
wire or the gRPC stream; :func:`forward_unary` for a unary Step), and the end of a one-stage replay.

- A step's ``route`` has one hop per stage; this stage must be its own hop (same replica, this
  node), and forwards to ``route[stage + 1]``: that replica, on that node (TLS checks the
  node's certificate), with that chain's step capability as metadata.
- An entry with ``replay_stages`` = k+1 is a reset prefill needed only by stages 0..k (stage k
  was re-routed to a replica that has no cache of the session); stage k sends on the entry's
  last position alone, as a one-token decode at the position the later stages expect.
"""

from __future__ import annotations

import threading

import grpc
import torch

from swarm.errors import InvalidRequestError
from swarm.proto.v1 import inference_pb2 as pb
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.transport.channels import data_channel
from swarm.transport.errors import error_from_rpc
from swarm.transport.inference import step_metadata
from swarm.transport.lazy_channels import RenewingStub
from swarm.transport.step_link import StepLink
from swarm.transport.step_wire import wire_target

MAX_PEER_CHANNELS = 64  # channels to other chains' stages kept open; the oldest is closed first


def route_hop(a: pb.ServeStageAssignment, request: pb.ServeStepRequest, node_id: str) -> pb.ServeRouteHop | None:
    """The validated next hop of ``request``'s route for the stage of assignment ``a`` (not the
    last stage); None when the step carries no route."""
    route = request.route
    if not route:
        return None
    if len(route) != a.num_stages:
        raise InvalidRequestError(f"a route names one hop per stage ({a.num_stages}), got {len(route)}")
    here, hop = route[a.stage], route[a.stage + 1]
    if here.replica != a.replica or (here.node_id and here.node_id != node_id):
        raise InvalidRequestError(f"route hop {a.stage} names replica {here.replica} on node {here.node_id[:12]}; "
                                  f"this is replica {a.replica} on node {node_id[:12]}")
    if not (0 <= hop.replica < 1 << 20 and 0 < len(hop.node_id) <= 128 and 0 < len(hop.address) <= 256
            and len(hop.capability) <= 256):
        raise InvalidRequestError(f"route hop {a.stage + 1} is malformed (replica, node id, address or capability)")
    return hop


class PeerStubs:
    """Stubs to other chains' stages by (node id, address), at most MAX_PEER_CHANNELS open."""

    def __init__(self, security) -> None:
        self._security = security
        self._stubs: dict[tuple[str, str], RenewingStub] = {}
        self._lock = threading.Lock()

    def get(self, node_id: str, address: str) -> RenewingStub:
        key = (node_id, address)
        with self._lock:
            stubs = self._stubs.get(key)
            if stubs is None:
                stubs = RenewingStub(lambda: data_channel(address, security=self._security, node_id=node_id),
                                     pb_grpc.InferenceStageStub, self._security)
                self._stubs[key] = stubs
                while len(self._stubs) > MAX_PEER_CHANNELS:
                    self._stubs.pop(next(iter(self._stubs))).close()
            return stubs

    def close(self) -> None:
        with self._lock:
            stubs, self._stubs = list(self._stubs.values()), {}
        for s in stubs:
            s.close()


def replayed_here(entries, out: torch.Tensor, stage: int):
    """The entries and hidden rows to send on: an entry whose re-route replay ends at this stage
    (``replay_stages == stage + 1``) goes on as a one-token decode of its last position (the
    later stages hold its prefix). Unchanged (no copy) when no entry ends here."""
    if not any(e.replay_stages == stage + 1 for e in entries):
        return entries, out
    fwd, rows, off = [], [], 0
    for e in entries:
        n = int(e.num_tokens)
        if e.replay_stages == stage + 1:
            d = pb.ServeSessionEntry()
            d.CopyFrom(e)
            d.start_position, d.num_tokens, d.reset, d.replay_stages = e.start_position + n - 1, 1, False, 0
            del d.token_ids[:]
            if e.token_ids:
                d.token_ids.append(e.token_ids[-1])
            fwd.append(d)
            rows.append(off + n - 1)
        else:
            fwd.append(e)
            rows.extend(range(off, off + n))
        off += n
    return fwd, out[torch.tensor(rows, device=out.device)]


def next_link(security, stage: int, hop: tuple, *, spin_s: float = 0.0) -> StepLink:
    """A persistent link to ``stage`` at ``hop`` (the servicer's ``_next_hop``: stubs,
    capability, replica, node id, address): its step wire where it can (its replies busy-polled
    for ``spin_s``: step_wire.wait_readable), else its StepStream."""
    stubs, capability, _, node_id, address = hop
    return StepLink(lambda requests, metadata: stubs.stub.StepStream(requests, metadata=metadata),
                    metadata=step_metadata(capability), what=f"stage {stage} at {address}",
                    wire=wire_target(security, address, node_id, stubs.stub, spin_s=spin_s))


def forward_unary(hop: tuple | None, nxt: pb.ServeStepRequest, *, timeout_s: float) -> pb.ServeStepReply:
    """One unary Step to ``hop`` (a unary Step is forwarded as one)."""
    assert hop is not None
    stubs, capability, _, _, address = hop
    try:
        return stubs.stub.Step(nxt, timeout=timeout_s, metadata=step_metadata(capability))
    except grpc.RpcError as exc:
        raise error_from_rpc(exc, f"stage {nxt.stage} at {address}") from exc
