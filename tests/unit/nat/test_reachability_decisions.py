"""Pure reachability decisions (swarm/reachability.py), the relay's token bucket and hub
bookkeeping (swarm/transport/relay.py), with a fake clock."""

from __future__ import annotations

import math

import pytest

from swarm.clock import FakeClock
from swarm.reachability import (
    COORDINATOR_RELAY, MAX_RELAYED_PER_VOLUNTEER, RelayOffer, choose_relay, decide, effective_reachability, link_path,
    link_paths, punched_peers, startup_message,
)
from swarm.transport.relay import HubEvent, RelayHub, RelayLimits, TokenBucket

COORD = RelayOffer(relay_id=COORDINATOR_RELAY, address="203.0.113.1:7071")


def vol(i: str, n: int = 0, rtt: float = math.inf) -> RelayOffer:
    return RelayOffer(relay_id=i * 32, address=f"198.51.100.{len(i)}:9000", peer_address="198.51.100.9:7000",
                      num_relayed=n, rtt_s=rtt)


def test_proved_and_free_address_is_direct():
    d = decide(advertised="198.51.100.7:7000", dial_ok=True, held_by_other=False, volunteers=[], coordinator_relay=COORD)
    assert (d.reachability, d.published_address, d.relay) == ("direct", "198.51.100.7:7000", None)


def test_unreachable_node_is_relayed_by_the_coordinator_without_volunteers():
    d = decide(advertised="192.168.1.5:7000", dial_ok=False, held_by_other=False, volunteers=[], coordinator_relay=COORD)
    assert d.reachability == "relayed" and d.relay == COORD and d.published_address == COORD.address


def test_an_address_held_by_another_online_node_is_never_published():
    d = decide(advertised="198.51.100.7:7000", dial_ok=True, held_by_other=True, volunteers=[], coordinator_relay=COORD)
    assert d.reachability == "relayed" and d.published_address != "198.51.100.7:7000"


def test_no_relay_at_all_is_an_error_the_caller_explains():
    with pytest.raises(ValueError):
        decide(advertised="10.0.0.2:1", dial_ok=False, held_by_other=False, volunteers=[], coordinator_relay=None)


def test_volunteers_preferred_least_loaded_then_lowest_rtt_then_id():
    a, b, c = vol("a", 2, 0.01), vol("b", 1, 0.5), vol("c", 1, 0.05)
    assert choose_relay([a, b, c], COORD) == c
    assert choose_relay([vol("e", 1, 0.05), vol("d", 1, 0.05)], COORD).relay_id == "d" * 32  # tie: smallest id
    full = vol("f", MAX_RELAYED_PER_VOLUNTEER, 0.001)
    assert choose_relay([full], COORD) == COORD
    assert choose_relay([], None) is None


@pytest.mark.parametrize("src,dst,punched,path", [
    ("direct", "direct", False, "direct"), ("direct", "relayed", False, "relayed"),
    ("relayed", "direct", False, "direct"),  # a NAT'd node dials out directly
    ("direct", "punched", False, "relayed"), ("relayed", "relayed", True, "punched"),
    ("punched", "relayed", False, "relayed"), ("pending", "direct", False, "direct"),
])
def test_link_path(src, dst, punched, path):
    assert link_path(src, dst, punched=punched) == path


def test_punched_pairs_come_from_metrics_and_are_validated():
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    path = link_paths([(a, "relayed", {"punched_peers": [b]}), (b, "relayed", {}), (c, "relayed", {}),
                       ("d" * 32, "relayed", {"punched_peers": "junk"}), ("e" * 32, "direct", {})])
    assert path(a, b) == path(b, a) == "punched"  # either end's report counts
    assert path(a, c) == "relayed" and path("e" * 32, "x" * 32) == "direct" and path(a, "e" * 32) == "direct"
    assert punched_peers({"punched_peers": [b, "not-an-id", 7, a.upper()]}) == {b}
    assert effective_reachability("relayed", {"punched_peers": [b]}) == "punched"
    assert effective_reachability("relayed", {}) == "relayed"
    assert effective_reachability("direct", {"punched_peers": [b]}) == "direct"


def test_startup_messages_say_what_was_found_and_that_nothing_is_to_open():
    direct = startup_message(reachability="direct", advertised="1.2.3.4:5", observed="1.2.3.4:999", relay_id="",
                             relay_address="", dial_error="")
    assert "reachable directly at 1.2.3.4:5" in direct
    relayed = startup_message(reachability="relayed", advertised="10.0.0.2:5", observed="203.0.113.9:4000",
                              relay_id=COORDINATOR_RELAY, relay_address="203.0.113.1:7071", dial_error="timed out")
    assert "not reachable at 10.0.0.2:5" in relayed and "203.0.113.9:4000" in relayed
    assert "203.0.113.1:7071" in relayed and "nothing to open by hand" in relayed


def test_token_bucket_paces_to_its_rate():
    clock = FakeClock()
    bucket = TokenBucket(1000.0, 500, clock)
    assert bucket.reserve(500) == 0.0  # the burst
    assert bucket.reserve(250) == pytest.approx(0.25)  # in debt: wait until the rate paid it
    clock.advance(0.25)
    assert bucket.reserve(100) == pytest.approx(0.1)
    clock.advance(10)
    assert bucket.reserve(500) == 0.0  # refilled, never beyond the burst
    assert bucket.reserve(1) > 0


def test_hub_routes_one_time_ids_and_counts_bytes():
    hub = RelayHub(RelayLimits(max_waiting_per_node=2))
    node = "ab" * 16
    assert hub.offer(node) is None  # nobody listens
    q = hub.listen(node)
    cid, waiting = hub.offer(node)
    assert q.get_nowait() == HubEvent("connect", cid) and len(cid) == 16
    assert hub.claim(b"x" * 16, object()) is False  # unknown id
    sock = object()
    assert hub.claim(cid, sock) is True and waiting.ready.is_set() and waiting.node_sock is sock
    assert hub.claim(cid, sock) is False  # one time only
    hub.offer(node), hub.offer(node)
    assert hub.offer(node) is None  # the node's queue is full: refused, not queued without bound
    q2 = hub.listen(node)  # a newer stream replaces the old one, which is told to end
    assert list(q.queue)[-1] is None  # even from a full queue
    hub.unlisten(node, q)  # the old stream's cleanup does not remove the new listener
    assert hub.listening() == [node]
    hub.unlisten(node, q2)
    assert hub.listening() == []
    hub.count(node, to_node=10, from_node=3)
    hub.count(node, to_node=5)
    assert hub.usage() == {node: {"to_node": 15, "from_node": 3}}


def test_relay_limits_are_validated():
    with pytest.raises(Exception):
        RelayLimits(rate_Bps=0)
    with pytest.raises(Exception):
        RelayLimits(max_per_ip=0)


def test_relayed_links_are_priced_within_the_relay_cap():
    import numpy as np

    from coordinator.network import relay_capped
    from swarm.membership import NodeInfo
    from tests.helpers.foundation import HW

    def node(c, reach, relay=""):
        return NodeInfo(id=c * 32, name=c, state="online", hardware=HW, peer_address="x:1", registered_at_s=0,
                        last_seen_at_s=0, reachability=reach, relay_node_id=relay)

    nodes = [node("a", "direct"), node("b", "relayed", "coordinator"), node("c", "relayed", "coordinator"),
             node("d", "relayed", "f" * 32)]
    bw = np.full((4, 4), 100e6)
    bw[0, 3] = np.nan
    out = relay_capped(bw, nodes, {"coordinator": 60e6})
    assert out[0, 1] == out[2, 1] == out[0, 2] == 30e6  # two nodes share the coordinator's 60 MB/s
    assert out[1, 0] == 100e6  # out of a NAT: dialled directly, not through the relay
    assert out[0, 3] != out[0, 3] and out[1, 3] == 100e6  # unmeasured stays NaN; a volunteer's cap is unknown
    assert relay_capped(np.full((4, 4), 1e6), nodes, {"coordinator": 60e6})[0, 1] == 1e6  # below the share: as measured
