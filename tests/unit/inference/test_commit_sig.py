"""Signed step commitments (swarm/inference/commit_sig.py): a stage relaying a step's reply cannot
alter a later stage's commitments or the tokens unseen, nor pass off another step's, nor speak
for an earlier stage; a check never blames on commitments nobody vouches for."""

from __future__ import annotations

import dataclasses

from swarm.identity import Identity
from swarm.inference.commit_sig import authentic_stages, derive_commit_key, keep_later, mac_stage, sign_stage
from swarm.inference.verify import ChainResult, Reference, StageCommit, agree, judge
from swarm.proto.v1 import inference_pb2 as pb

IDS = [Identity.from_seed(bytes([i]) * 32) for i in range(3)]
NONCE = b"n" * 12


def commitment(stage: int, value: float, session: str = "s") -> pb.ServeCommitment:
    return pb.ServeCommitment(stage=stage, session_id=session, input=[value] * 32, output=[value + 1] * 32)


def signed_reply(nonce: bytes = NONCE) -> pb.ServeStepReply:
    """A 3-stage chain's reply as the stages build it on its way back (last stage first)."""
    reply = pb.ServeStepReply(token_ids=[7, 9], commitments=[commitment(2, 2.0)])
    sign_stage(reply, model="m", stage=2, nonce=nonce, last=True, sign=IDS[2].sign)
    for k in (1, 0):
        keep_later(reply, k)
        reply.commitments.append(commitment(k, float(k)))
        sign_stage(reply, model="m", stage=k, nonce=nonce, last=False, sign=IDS[k].sign)
    return reply


def check(reply: pb.ServeStepReply, nonce: bytes = NONCE) -> list[bool]:
    keys = {i.node_id: i.public_key for i in IDS}
    return authentic_stages(reply, model="m", nonce=nonce, node_ids=[i.node_id for i in IDS], public_key=keys.__getitem__)


def test_an_untouched_reply_is_vouched_for_by_every_stage():
    assert check(signed_reply()) == [True, True, True]


def test_what_a_relaying_stage_alters_is_seen():
    reply = signed_reply()
    reply.commitments[0].output[0] = -5.0  # stage 0 rewrites stage 2's output on the way back
    assert check(reply) == [True, True, False]
    reply = signed_reply()
    reply.token_ids[0] = 8  # the tokens are the last stage's
    assert check(reply) == [True, True, False]
    reply = signed_reply()
    del reply.commitments[0]  # dropping a later stage's commitments
    assert check(reply) == [True, True, False]
    reply = signed_reply()
    del reply.signatures[0]
    assert check(reply) == [True, True, False]


def test_another_steps_signed_commitments_do_not_pass():
    assert check(signed_reply(nonce=b"o" * 12)) == [False, False, False]


def test_a_later_stage_cannot_speak_for_an_earlier_one():
    reply = pb.ServeStepReply(token_ids=[1], commitments=[commitment(0, 9.0), commitment(1, 1.0)])
    reply.signatures.append(pb.ServeStageSignature(stage=0, signature=b"x" * 64))
    keep_later(reply, 0)  # what stage 0 does with the reply of stage 1 before adding its own
    assert [c.stage for c in reply.commitments] == [1] and list(reply.signatures) == []


def test_unknown_nodes_and_garbage_signatures_are_not_vouched_for():
    reply = signed_reply()
    reply.signatures[0].signature = b"\x00" * 3
    assert authentic_stages(reply, model="m", nonce=NONCE, node_ids=[i.node_id for i in IDS],
                            public_key=lambda nid: (_ for _ in ()).throw(KeyError(nid))) == [False] * 3


def test_nobody_is_blamed_on_commitments_nobody_vouches_for():
    good = tuple(float(i + 1) for i in range(32))
    bad = tuple(-v for v in good)
    stages = (StageCommit(node_id="a", first_layer=0, last_layer_excl=2, output=good),
              StageCommit(node_id="b", first_layer=2, last_layer_excl=4, input=good, output=bad))
    chain = ChainResult(replica=0, stages=stages, token=3)
    ref = Reference(outputs={2: good, 4: good}, tokens=frozenset({3}))
    assert judge(chain, ref).guilty == "b"  # signed: b's own output is wrong
    forged = dataclasses.replace(chain, stages=(stages[0], dataclasses.replace(stages[1], authentic=False)))
    j = judge(forged, ref)
    assert not j.ok and j.guilty is None and "not signed" in j.reason
    right = dataclasses.replace(stages[1], output=good)
    assert agree(dataclasses.replace(chain, stages=(stages[0], right)), dataclasses.replace(chain, stages=(stages[0], right)))
    assert not agree(dataclasses.replace(chain, stages=(stages[0], dataclasses.replace(right, authentic=False))),
                     dataclasses.replace(chain, stages=(stages[0], right)))


# ----------------------------------------------------------------------------- commit keys (MACs)
SECRET = b"s" * 32


def key_of(node_id: str, stage: int) -> bytes:
    return derive_commit_key(SECRET, node_id=node_id, model="m", stage=stage)


def mac_reply(nonce: bytes = NONCE, *, signer: int | None = None) -> pb.ServeStepReply:
    """:func:`signed_reply` with every stage's MAC under its commit key (stage ``signer`` signs
    with its identity instead: a node older than commit keys)."""
    reply = pb.ServeStepReply(token_ids=[7, 9], commitments=[commitment(2, 2.0)])
    for k in (2, 1, 0):
        if k < 2:
            keep_later(reply, k)
            reply.commitments.append(commitment(k, float(k)))
        if k == signer:
            sign_stage(reply, model="m", stage=k, nonce=nonce, last=k == 2, sign=IDS[k].sign)
        else:
            mac_stage(reply, model="m", stage=k, nonce=nonce, last=k == 2, key=key_of(IDS[k].node_id, k))
    return reply


def check_keys(reply: pb.ServeStepReply, nonce: bytes = NONCE, secret: bytes = SECRET) -> list[bool]:
    keys = {i.node_id: i.public_key for i in IDS}
    return authentic_stages(reply, model="m", nonce=nonce, node_ids=[i.node_id for i in IDS],
                            public_key=keys.__getitem__,
                            commit_key=lambda nid, k: derive_commit_key(secret, node_id=nid, model="m", stage=k))


def test_commit_keys_differ_per_node_model_and_stage():
    a = IDS[0].node_id
    keys = {derive_commit_key(SECRET, node_id=n, model=m, stage=k)
            for n in (a, IDS[1].node_id) for m in ("m", "m2") for k in (0, 1)}
    assert len(keys) == 8 and all(len(k) == 32 for k in keys)
    assert derive_commit_key(b"t" * 32, node_id=a, model="m", stage=0) not in keys


def test_macs_vouch_like_signatures_and_show_what_a_relay_alters():
    assert check_keys(mac_reply()) == [True, True, True]
    reply = mac_reply()
    reply.commitments[0].output[0] = -5.0  # stage 0 rewrites stage 2's output on the way back
    assert check_keys(reply) == [True, True, False]
    reply = mac_reply()
    reply.token_ids[0] = 8
    assert check_keys(reply) == [True, True, False]
    assert check_keys(mac_reply(nonce=b"o" * 12)) == [False, False, False]  # another step's


def test_a_relay_cannot_forge_a_mac_with_its_own_key_or_another_coordinators():
    reply = mac_reply()
    payload_key = key_of(IDS[1].node_id, 1)  # stage 1 knows its own key only
    reply.commitments[0].output[0] = -5.0
    reply.signatures[0].mac = mac_of(reply, 2, payload_key)
    assert check_keys(reply) == [True, True, False]
    assert check_keys(mac_reply(), secret=b"t" * 32) == [False, False, False]  # keys of a restarted coordinator


def test_a_stage_that_signs_instead_of_using_its_key_is_still_vouched_for():
    assert check_keys(mac_reply(signer=1)) == [True, True, True]
    reply = mac_reply(signer=1)
    reply.commitments[1].output[0] = -5.0  # stage 1's commitment (the one after stage 2's)
    assert check_keys(reply) == [True, False, True]


def mac_of(reply: pb.ServeStepReply, stage: int, key: bytes) -> bytes:
    probe = pb.ServeStepReply()
    probe.CopyFrom(reply)
    del probe.signatures[:]
    mac_stage(probe, model="m", stage=stage, nonce=NONCE, last=stage == 2, key=key)
    return probe.signatures[0].mac
