"""Witness copies weighed against the checked node's own commitments (coordinator/jobs/binding.py,
through spotchecks.py ``Judge``; node/training/commitments.py): a witness sending false copies
frames nobody and is convicted once it has disputed two neighbours; a node lying about what it
received is convicted once two neighbours disputed it; copies that are the target's own word
leave the checker's accusation standing."""

import pytest
import torch

from coordinator.jobs import binding
from coordinator.jobs.spotchecks import Judge
from node.training.commitments import tensor_digest
from swarm.errors import InvalidRequestError
from swarm.proto.v1 import training_pb2 as pb
from swarm.transport.jobs import MAX_DIGESTS, progress_from_pb

REAL, FAKE, OTHER = b"r" * 16, b"f" * 16, b"o" * 16


def _asg(layout):
    """assignments of ``layout``: stage -> [node id per replica]."""
    return [{"node_id": n, "address": f"h:{n}", "stage": s, "replica": r, "num_replicas": len(devs)}
            for s, devs in enumerate(layout) for r, n in enumerate(devs)]


def _loss_check(replica, step, copies):
    """The last stage's checker found the loss of micro-batch 0 of (1, replica) 1 nat off."""
    return {"stage": 1, "replica": replica, "step": step, "micro_batch": 0, "what": "loss", "match": True,
            "error": 0.0, "tolerance": 0.1, "repeated_match": True, "value": 3.0, "copies": copies}


def _step(j, attempt, asg, step, *, target, checker, witness, target_input, witness_output, copy,
          witness_last=False):
    """One step of a 2-stage job: the witness (stage 0) sent the target (stage 1) an activation;
    each commits to its side of it; the checker recomputed the target's loss from the witness's
    copy. Returns the verdicts."""
    at = {a["node_id"]: a for a in asg}
    out = []
    reports = [(target, {"step": step, "param_digest": "d", "micro_batch_losses": [2.0],
                         "digests": {(0, "input"): target_input}}),
               (checker, {"step": step, "param_digest": "d",
                          "checks": [_loss_check(at[target]["replica"], step, {"input": copy})]}),
               (witness, {"step": step, "param_digest": "d", "digests": {(0, "output"): witness_output}})]
    if witness_last:
        reports = [reports[0], reports[1], reports[2]]
    else:
        reports = [reports[2], reports[0], reports[1]]
    for node, r in reports:
        out += j.report("j", attempt, at[node], asg, r)
    return out


@pytest.mark.timeout(10)
def test_copies_that_are_the_target_s_own_word_bind_it():
    assert binding.weigh({"input": REAL}, 0, checker="c", target_id="t", target={(0, "input"): REAL},
                         witness=lambda side: ("w", {}), what_checked="loss") is None
    # a node that commits nothing is not protected by commitments (nor by anything else)
    assert binding.weigh({"input": FAKE}, 0, checker="c", target_id="t", target={},
                         witness=lambda side: ("w", {}), what_checked="loss") is None
    assert binding.bound({"input": REAL}, 0, {(0, "input"): REAL}) and not binding.bound({}, 0, {(0, "input"): REAL})


@pytest.mark.timeout(10)
def test_a_copy_the_target_disowns_is_weighed_against_its_witness():
    target = {(0, "input"): REAL, (0, "output_ref"): REAL}
    sides = []

    def w(commits):
        return lambda side: sides.append(side) or ("w", commits)
    # the witness says it sent what it copied, the target says otherwise: the witness's word against the target's
    c = binding.weigh({"input": FAKE}, 0, checker="c", target_id="t", target=target,
                      witness=w({(0, "output"): FAKE}), what_checked="loss")
    assert (c.accuser, c.accused) == ("w", "t") and "disagree" in c.reason and sides == [-1]
    # the witness's copy is not even what it says it sent: the checker accuses the witness
    c = binding.weigh({"input": FAKE}, 0, checker="c", target_id="t", target=target,
                      witness=w({(0, "output"): REAL}), what_checked="loss")
    assert (c.accuser, c.accused) == ("c", "w") and "false copy" in c.reason
    # its commitments are not in yet: wait for them
    assert binding.weigh({"input": FAKE}, 0, checker="c", target_id="t", target=target, witness=w(None),
                         what_checked="loss") == binding.WAIT
    # the next stage left its own m(x) reference out of its commitments: its word against the target's
    sides.clear()
    c = binding.weigh({"output": REAL, "output_ref": FAKE}, 0, checker="c", target_id="t",
                      target={**target, (0, "output"): REAL}, witness=w({(0, "input"): REAL}), what_checked="output")
    assert (c.accuser, c.accused) == ("w", "t") and sides == [1]
    # a checker claiming a reference copy that differs from what both ends committed to (the target
    # its mirror, the witness its own m(x)) cannot make the witness the accuser: it accuses the witness
    # itself, and its word is weighed by the dispute rules
    c = binding.weigh({"output": REAL, "output_ref": FAKE}, 0, checker="c", target_id="t",
                      target={**target, (0, "output"): REAL}, witness=w({(0, "input"): REAL, (0, "input_ref"): REAL}),
                      what_checked="output")
    assert (c.accuser, c.accused) == ("c", "w")
    # a copy of a kind that has no witness (a checker's invention) is ignored
    assert binding.contested({"input_ref": FAKE}, 0, {(0, "input_ref"): REAL}) == []
    # no such neighbour in the plan: no evidence either way
    assert binding.weigh({"input": FAKE}, 0, checker="c", target_id="t", target=target, witness=lambda side: None,
                         what_checked="loss") == binding.VOID


@pytest.mark.timeout(10)
def test_a_witness_framing_its_neighbours_is_convicted_and_they_are_not():
    j = Judge()
    # a witnesses t (stage 1, replica 0) for t's checker c; it copies a false input and commits to it
    asg = _asg([["a", "b"], ["t", "c"]])
    for witness_last in (False, True):  # whichever report comes last, the check is weighed once all are in
        jj = Judge()
        assert _step(jj, 1, asg, 3, target="t", checker="c", witness="a", target_input=REAL, witness_output=FAKE,
                     copy=FAKE, witness_last=witness_last) == []
        (d,) = jj.take_disputes("j")
        assert (d.accuser, d.target) == ("a", "t") and "disagree" in d.reason and "reported loss" in d.reason
    assert _step(j, 1, asg, 3, target="t", checker="c", witness="a", target_input=REAL, witness_output=FAKE,
                 copy=FAKE) == []
    assert [(d.accuser, d.target) for d in j.take_disputes("j")] == [("a", "t")]
    assert j.stats("j")["contested"] == 1
    # re-planned apart: a now witnesses c (checked by t), and frames it the same way
    asg2 = _asg([["a", "b"], ["c", "t"]])
    (v,) = _step(j, 2, asg2, 6, target="c", checker="t", witness="a", target_input=REAL, witness_output=FAKE,
                 copy=FAKE)
    assert v.node_id == "a" and v.first_bad_step is None and "misreports" in v.reason
    assert j.take_disputes("j") == []


@pytest.mark.timeout(10)
def test_a_node_lying_about_what_it_received_is_convicted_by_two_neighbours():
    j = Judge()
    # t computes a wrong loss and disowns the input it got, hoping to void the check of it
    asg = _asg([["a", "b"], ["t", "c"]])
    assert _step(j, 1, asg, 3, target="t", checker="c", witness="a", target_input=OTHER, witness_output=REAL,
                 copy=REAL) == []
    assert [(d.accuser, d.target) for d in j.take_disputes("j")] == [("a", "t")]
    asg2 = _asg([["b", "a"], ["t", "c"]])  # apart from a: b feeds it now
    (v,) = _step(j, 2, asg2, 6, target="t", checker="c", witness="b", target_input=OTHER, witness_output=REAL,
                 copy=REAL)
    assert v.node_id == "t" and v.first_bad_step == 3


@pytest.mark.timeout(10)
def test_a_witness_whose_copy_is_not_its_own_word_is_accused_by_the_checker():
    j = Judge()
    asg = _asg([["a", "b"], ["t", "c"]])
    assert _step(j, 1, asg, 3, target="t", checker="c", witness="a", target_input=REAL, witness_output=REAL,
                 copy=FAKE) == []
    (d,) = j.take_disputes("j")
    assert (d.accuser, d.target) == ("c", "a") and "false copy" in d.reason


@pytest.mark.timeout(10)
def test_an_honest_wrong_result_is_still_the_target_s():
    j = Judge()
    asg = _asg([["a", "b"], ["t", "c"]])
    assert _step(j, 1, asg, 3, target="t", checker="c", witness="a", target_input=REAL, witness_output=REAL,
                 copy=REAL) == []
    (d,) = j.take_disputes("j")
    assert (d.accuser, d.target) == ("c", "t") and "reported loss" in d.reason
    assert j.stats("j")["bound"] == 1 and j.stats("j")["contested"] == 0


@pytest.mark.timeout(10)
def test_tensor_digest_is_of_the_values_wherever_they_live():
    t = torch.randn(2, 3, 4)
    assert tensor_digest(t) == tensor_digest(t.clone()) == tensor_digest(t.double())
    assert len(tensor_digest(t)) == 16
    u = t.clone()
    u[0, 0, 0] += 1e-6
    assert tensor_digest(u) != tensor_digest(t)
    assert tensor_digest(t.reshape(3, 2, 4)) != tensor_digest(t)  # the shape is part of it


@pytest.mark.timeout(10)
def test_malformed_digests_in_a_report_are_refused():
    def report(*digests, copies=()):
        return progress_from_pb(pb.ProgressReport(job_id="j", state="running", digests=list(digests), checks=[
            pb.SpotCheck(stage=0, replica=0, step=0, micro_batch=1, what="output", copies=list(copies))]))

    ok = report(pb.TensorDigest(micro_batch=1, what="input", digest=REAL))
    assert ok["digests"] == {(1, "input"): REAL} and ok["checks"][0]["copies"] == {}
    assert report(copies=[pb.TensorDigest(micro_batch=1, what="output", digest=FAKE)])["checks"][0]["copies"] == {
        "output": FAKE}
    for bad in (pb.TensorDigest(micro_batch=1, what="weights", digest=REAL),
                pb.TensorDigest(micro_batch=1, what="input", digest=b"short"),
                pb.TensorDigest(micro_batch=-1, what="input", digest=REAL),
                pb.TensorDigest(micro_batch=5000, what="input", digest=REAL)):
        with pytest.raises(InvalidRequestError):
            report(bad)
    with pytest.raises(InvalidRequestError, match="two different digests"):
        report(pb.TensorDigest(micro_batch=1, what="input", digest=REAL),
               pb.TensorDigest(micro_batch=1, what="input", digest=FAKE))
    with pytest.raises(InvalidRequestError, match="must name one of"):  # a witness's own word, never a copy
        report(copies=[pb.TensorDigest(micro_batch=1, what="input_ref", digest=FAKE)])
    with pytest.raises(InvalidRequestError, match="its own micro-batch"):
        report(copies=[pb.TensorDigest(micro_batch=2, what="output", digest=FAKE)])
    with pytest.raises(InvalidRequestError, match="at most"):
        report(*[pb.TensorDigest(micro_batch=i % 4096, what="input", digest=REAL) for i in range(MAX_DIGESTS + 1)])


@pytest.mark.timeout(10)
def test_a_step_s_commitments_are_taken_once_in_order():
    from node.training.commitments import StepCommitments

    c, t = StepCommitments(), torch.randn(2, 4)
    c.add(0, "input", t)
    c.add(1, "output", t * 2)
    assert c.take() == [(0, "input", tensor_digest(t)), (1, "output", tensor_digest(t * 2))]
    assert c.take() == []


@pytest.mark.timeout(30)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_commitments_of_gpu_tensors_are_those_of_their_values():
    from node.training.commitments import StepCommitments

    c, t = StepCommitments(), torch.randn(2, 64, 64)
    g = t.cuda()
    c.add(0, "input", g)
    c.add(0, "output", g.half())  # a half-precision tensor is committed as its float32 values
    rows, seen = torch.randn(2, 8).half(), torch.tensor([True, False])
    c.add_reference(1, rows.cuda(), seen)
    g.mul_(3)  # queued after the copies: not in them
    from node.training.commitments import reference

    assert c.take() == [(0, "input", tensor_digest(t)), (0, "output", tensor_digest(t.half())),
                        (1, "output_ref", tensor_digest(reference(rows, seen)))]


@pytest.mark.timeout(30)
def test_an_aqsgd_sender_commits_bit_for_bit_to_what_its_receiver_computes_on():
    """The two ends of a boundary: the sender's kept reconstruction and m(x) before each message
    are the receiver's decoded input and its m(x) reference, digest for digest, over an epoch of
    first visits and then of changes."""
    from node.training.commitments import reference
    from swarm.compression import BoundaryCodec, RamStore

    spec, n, row = "aqsgd:fw=2,bw=4", 6, (4, 8)
    send, recv = (BoundaryCodec(spec, key="k", store=RamStore(key="k", num_samples=n, row_shape=row)) for _ in "ab")
    send.keep_sent = True
    gen = torch.Generator().manual_seed(0)
    for epoch in range(3):
        for ids in ([0, 1, 2], [3, 4, 5]):
            a = torch.randn(3, *row, generator=gen) + epoch
            t_ids = torch.tensor(ids)  # the receiver's m(x) before the message (its input_ref, the ref copy)
            ref = reference(recv.store.read(t_ids, "cpu"), recv.store.seen(t_ids))
            msg = send.encode_forward(a, ids)
            keep = {}
            got = recv.decode_forward(msg, ids, dtype=torch.float32, keep=keep)
            assert tensor_digest(reference(keep["rows"], keep["seen"])) == tensor_digest(ref)
            sent_msg, sent, before, seen = send.last_sent
            assert sent_msg is msg
            assert tensor_digest(sent) == tensor_digest(got)
            assert tensor_digest(reference(before, seen)) == tensor_digest(ref)


@pytest.mark.timeout(10)
def test_the_judge_keeps_a_bounded_window_of_commitments():
    """A worker's commitments are kept for the steps around its latest report, and only for the
    job's micro-batches: a node flooding digests (or reporting far-off steps) cannot grow them."""
    j = Judge()
    asg = _asg([["a", "b"], ["t", "c"]])
    at = {a["node_id"]: a for a in asg}
    many = {(m, "input"): REAL for m in range(4000)}
    for step in (1000, 0, 999, 998, 1, 2, 3):
        j.report("j", 1, at["t"], asg, {"step": step, "param_digest": "d", "digests": many}, micro_batches=4)
    kept = j._jobs["j"].digests
    assert sorted(k[3] for k in kept) == [1, 2, 3]  # (0 went when 999 came)
    assert all(len(d) == 4 for d in kept.values())
