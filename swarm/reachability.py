"""Reachability decisions: how peers reach a node, which relay serves it, what a link's path is.

Pure functions over plain values (no sockets): the coordinator's dial-back
(coordinator/reachability.py) and the node's start-up report call them; unit tests drive them.

- A node is ``direct`` when the coordinator dialled its advertised address and the server there
  proved the node's id over mTLS; peers then dial that address.
- Otherwise it is ``relayed``: peers dial its relay's relay port (swarm/transport/relay.py),
  which the node keeps an outbound stream to. The relay is the least loaded volunteer relay
  (nodes started with ``--relay`` that are themselves direct), ties by the coordinator's RTT
  to it, then id; the coordinator's own relay when no volunteer offers one.
- ``punched``: a relayed node that holds hole-punched connections (swarm/transport/punch.py)
  to other NAT'd nodes: those links are ``punched``, its other links still relayed. Nodes report
  their live punched peers in heartbeat metrics (``punched_peers``); status derives it.
- ``pending``: registered, dial-back not finished; such a node is given no work and no peer is
  sent to it (issue 11: the node proves its id before anyone dials its address).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

REACHABILITY = ("pending", "direct", "punched", "relayed")
PATHS = ("direct", "punched", "relayed")
COORDINATOR_RELAY = "coordinator"


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayOffer:
    """A relay a node could use: ``relay_id`` is a node id or ``"coordinator"``."""

    relay_id: str
    address: str  # host:port of its relay port
    peer_address: str = ""  # a volunteer's peer port (where the Listen stream goes); "" for the coordinator
    num_relayed: int = 0  # nodes it relays now
    rtt_s: float = math.inf  # the coordinator's dial-back RTT to it (inf: unknown)

    def __post_init__(self) -> None:
        if not self.relay_id or not self.address:
            raise ValueError("a relay offer needs an id and an address")
        if self.num_relayed < 0 or not (self.rtt_s >= 0):
            raise ValueError("num_relayed must be >= 0 and rtt_s >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    reachability: str  # "direct" | "relayed"
    published_address: str  # what peers dial
    relay: RelayOffer | None = None


MAX_RELAYED_PER_VOLUNTEER = 16  # past this a volunteer relay counts as full (the coordinator's never is)


def choose_relay(volunteers: list[RelayOffer], coordinator: RelayOffer | None) -> RelayOffer | None:
    """The relay for a new relayed node: the volunteer with the fewest relayed nodes (not full),
    then the lowest RTT, then the smallest id (deterministic); else the coordinator's; None when
    there is no relay at all."""
    open_ = [v for v in volunteers if v.num_relayed < MAX_RELAYED_PER_VOLUNTEER]
    if open_:
        return min(open_, key=lambda v: (v.num_relayed, v.rtt_s, v.relay_id))
    return coordinator


def decide(*, advertised: str, dial_ok: bool, held_by_other: bool, volunteers: list[RelayOffer],
           coordinator_relay: RelayOffer | None) -> Decision:
    """Direct when the dial-back proved the node at ``advertised`` and no other online node holds
    that address; otherwise relayed through :func:`choose_relay`. Raises ValueError when the node
    is unreachable and there is no relay (the caller tells the user what to do)."""
    if dial_ok and not held_by_other:
        return Decision(reachability="direct", published_address=advertised)
    relay = choose_relay(volunteers, coordinator_relay)
    if relay is None:
        raise ValueError("no relay is available")
    return Decision(reachability="relayed", published_address=relay.address, relay=relay)


def link_path(src: str, dst: str, *, punched: bool = False) -> str:
    """The path of traffic from a node of reachability ``src`` to one of ``dst``. Traffic i -> j
    runs on a connection i dialled to j (swarm's pipelines, probes and shard fetches all push to
    the node they dial), so the path depends on ``dst``: ``punched`` when the two punched a hole
    to each other, relayed when ``dst`` is reached through a relay (a relayed node, or a punched
    one towards peers it did not punch to), else direct (a NAT'd node dials out directly)."""
    if punched:
        return "punched"
    if dst in ("relayed", "punched"):
        return "relayed"
    return "direct"


MAX_PUNCHED_PEERS = 256


def punched_peers(metrics: dict) -> frozenset[str]:
    """The peers a node reports live punched connections with (heartbeat metric
    ``punched_peers``, swarm/transport/punch.py); malformed entries are ignored (network input)."""
    value = metrics.get("punched_peers") if isinstance(metrics, dict) else None
    if not isinstance(value, list):
        return frozenset()
    return frozenset(v for v in value[:MAX_PUNCHED_PEERS]
                     if isinstance(v, str) and len(v) == 32 and all(c in "0123456789abcdef" for c in v))


def effective_reachability(reachability: str, metrics: dict) -> str:
    """What status shows: a relayed node holding at least one punched connection is ``punched``."""
    return "punched" if reachability == "relayed" and punched_peers(metrics) else reachability


def link_paths(nodes: list[tuple[str, str, dict]]) -> Callable[[str, str], str]:
    """``path(src, dst)`` over nodes given as (id, reachability, metrics); unknown ends count as direct."""
    reach = {i: r for i, r, _ in nodes}
    pairs = {frozenset((i, p)) for i, _, m in nodes for p in punched_peers(m) if p != i}

    def path(src: str, dst: str) -> str:
        return link_path(reach.get(src, "direct"), reach.get(dst, "direct"), punched=frozenset((src, dst)) in pairs)

    return path


def startup_message(*, reachability: str, advertised: str, observed: str, relay_id: str, relay_address: str,
                    dial_error: str) -> str:
    """What ``swarm-node join`` logs once the coordinator dialled it back."""
    if reachability == "direct":
        return f"reachable directly at {advertised} (the coordinator dialled it and this node proved its id)"
    seen = f" (seen from the coordinator as {observed})" if observed else ""
    why = f": {dial_error}" if dial_error else ""
    who = "the coordinator's relay" if relay_id == COORDINATOR_RELAY else f"volunteer relay {relay_id[:12]}"
    return (f"not reachable at {advertised}{seen}{why}; using {who} at {relay_address}: peers reach this "
            "node through it, end-to-end encrypted; nothing to open by hand")
