"""heal(): the pure decision that keeps served models at their requested replica count."""

from __future__ import annotations

import pytest

from swarm.errors import InvalidRequestError
from swarm.scheduling.healing import (AddChain, Chain, ChainStage, DropChain, HealNode, ModelNeeds, RepairChain,
                                      RetireChain, Wait, heal)

pytestmark = pytest.mark.timeout(10)

MiB = 1 << 20
MODEL = ModelNeeds(name="m", requested=2, layout=((0, 2), (2, 4)), layer_bytes=10 * MiB, embed_bytes=5 * MiB,
                   head_bytes=5 * MiB)


def nodes(*ids: str, memory: int = 1 << 30, **kw) -> list[HealNode]:
    return [HealNode(node_id=i, tflops=1.0, memory_free_bytes=memory, **kw) for i in ids]


def chain(replica: int, a: str, b: str, state: str = "ready", lost: tuple[str, ...] = ()) -> Chain:
    return Chain(model="m", replica=replica, state=state, lost_node_ids=frozenset(lost),
                 stages=(ChainStage(node_id=a, first_layer=0, last_layer_excl=2),
                         ChainStage(node_id=b, first_layer=2, last_layer_excl=4)))


def test_at_requested_count_nothing_to_do():
    assert heal([MODEL], nodes("a", "b", "c", "d", "e"), [chain(0, "a", "b"), chain(1, "c", "d")]) == []


def test_broken_chain_gets_only_its_lost_stage_on_the_spare():
    acts = heal([MODEL], nodes("a", "c", "d", "e"), [chain(0, "a", "b", "broken", lost=("b",)), chain(1, "c", "d")])
    assert acts == [RepairChain(model="m", replica=0, replacements=((1, "e"),))]


def test_idempotent_while_the_repair_loads():
    placements = [chain(0, "a", "e", "loading"), chain(1, "c", "d")]
    assert heal([MODEL], nodes("a", "c", "d", "e"), placements) == []


def test_ready_chain_with_an_offline_node_is_retired_first():
    acts = heal([MODEL], nodes("a", "c", "d", "e"), [chain(0, "a", "b"), chain(1, "c", "d")])
    assert acts[0] == RetireChain(model="m", replica=0, reason="node b is offline")
    # the retired chain's survivor "a" is no spare; "e" is the only one and a new chain needs two
    assert isinstance(acts[1], Wait)


def test_no_spare_waits_with_a_message_and_a_new_node_heals():
    placements = [chain(0, "a", "b", "broken", lost=("b",)), chain(1, "c", "d")]
    acts = heal([MODEL], nodes("a", "c", "d"), placements)
    assert len(acts) == 1 and isinstance(acts[0], Wait) and "start more nodes" in acts[0].reason
    assert heal([MODEL], nodes("a", "c", "d", "f"), placements) == [
        RepairChain(model="m", replica=0, replacements=((1, "f"),))]


def test_spare_without_memory_is_not_used():
    small = HealNode(node_id="e", tflops=100.0, memory_free_bytes=MODEL.stage_bytes(2, 4, first=False, last=True) - 1)
    acts = heal([MODEL], nodes("a", "c", "d") + [small], [chain(0, "a", "b", "broken", lost=("b",)), chain(1, "c", "d")])
    assert isinstance(acts[0], Wait)


def test_backing_off_and_unusable_nodes():
    placements = [chain(0, "a", "b", "broken", lost=("b",)), chain(1, "c", "d")]
    backoff = ModelNeeds(name="m", requested=2, layout=MODEL.layout, layer_bytes=1, backoff=True)
    assert [type(a) for a in heal([backoff], nodes("a", "c", "d", "e"), placements)] == [Wait]
    bad = nodes("a", "c", "d") + nodes("e", usable=False)
    assert [type(a) for a in heal([MODEL], bad, placements)] == [Wait]


def test_a_node_that_comes_back_is_used_once_not_twice():
    # b died in chain 0 and came back (empty, online again); chain 1 lost d; one more spare e
    placements = [chain(0, "a", "b", "broken", lost=("b",)), chain(1, "c", "d", "broken", lost=("d",)),
                  chain(2, "f", "g")]
    three = ModelNeeds(name="m", requested=3, layout=MODEL.layout, layer_bytes=1)
    acts = heal([three], nodes("a", "b", "c", "e", "f", "g"), placements)
    repairs = [a for a in acts if isinstance(a, RepairChain)]
    assert len(repairs) == 2
    picked = [nid for r in repairs for _, nid in r.replacements]
    assert sorted(picked) == ["b", "e"]  # each spare once; b (back, holding nothing) counts as a spare
    # survivors a, c and the healthy chain's f, g are never spares
    assert not {"a", "c", "f", "g"} & set(picked)


def test_node_that_comes_back_while_its_chain_was_repaired_is_not_added_to_it():
    # chain 0 was repaired onto e; b comes back: the model is at its count, b stays unused
    assert heal([MODEL], nodes("a", "b", "c", "d", "e"), [chain(0, "a", "e"), chain(1, "c", "d")]) == []


def test_whole_chain_lost_adds_a_new_chain_with_the_layout():
    one = [chain(1, "c", "d")]
    acts = heal([MODEL], nodes("c", "d", "x", "y"), one)
    assert acts == [AddChain(model="m", stages=(ChainStage(node_id="x", first_layer=0, last_layer_excl=2),
                                                ChainStage(node_id="y", first_layer=2, last_layer_excl=4)))]


def test_surplus_broken_chain_is_dropped():
    placements = [chain(0, "a", "b", "broken", lost=("b",)), chain(1, "c", "d"), chain(2, "e", "f")]
    assert heal([MODEL], nodes("a", "c", "d", "e", "f", "g"), placements) == [DropChain(model="m", replica=0)]


def test_fewest_lost_stages_repaired_first_and_fastest_spare_wins():
    placements = [chain(0, "a", "b", "broken", lost=("a", "b")), chain(1, "c", "d", "broken", lost=("d",))]
    one = ModelNeeds(name="m", requested=1, layout=MODEL.layout, layer_bytes=1)
    fast = [HealNode(node_id="s1", tflops=1.0, memory_free_bytes=1 << 30),
            HealNode(node_id="s2", tflops=5.0, memory_free_bytes=1 << 30)]
    acts = heal([one], nodes("c") + fast, placements)
    assert acts == [RepairChain(model="m", replica=1, replacements=((1, "s2"),)), DropChain(model="m", replica=0)]


def test_two_models_do_not_share_one_spare_beyond_its_memory():
    need = MODEL.stage_bytes(2, 4, first=False, last=True)
    other = ModelNeeds(name="n", requested=1, layout=((0, 2), (2, 4)), layer_bytes=MODEL.layer_bytes,
                       embed_bytes=MODEL.embed_bytes, head_bytes=MODEL.head_bytes)
    placements = [chain(0, "a", "b", "broken", lost=("b",)), chain(1, "c", "d"),
                  Chain(model="n", replica=0, state="broken", lost_node_ids=frozenset({"h"}),
                        stages=(ChainStage(node_id="g", first_layer=0, last_layer_excl=2),
                                ChainStage(node_id="h", first_layer=2, last_layer_excl=4)))]
    spare = [HealNode(node_id="e", tflops=1.0, memory_free_bytes=need + need // 2)]
    acts = heal([other, MODEL], nodes("a", "c", "d", "g", memory=0) + spare, placements)
    assert acts[0] == RepairChain(model="m", replica=0, replacements=((1, "e"),))  # models in name order
    assert isinstance(acts[1], Wait) and acts[1].model == "n"


def test_bad_snapshot_is_refused():
    with pytest.raises(InvalidRequestError):
        Chain(model="m", replica=0, state="dead", stages=(ChainStage(node_id="a", first_layer=0, last_layer_excl=1),))
    with pytest.raises(InvalidRequestError):
        ChainStage(node_id="a", first_layer=2, last_layer_excl=2)
