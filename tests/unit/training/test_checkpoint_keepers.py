"""Second copies of checkpoints (node/training/kept.py, coordinator/jobs/keepers.py): the pure
choice of keeper and of the resume source when the coordinator's copy is lost, the lost-copy
check, and, in process over mTLS, a keeper copying a worker's checkpoint (honest copy kept
atomically with 0600 files; a tampered copy refused at resume; an unassigned caller refused)."""

import hashlib
import json
import threading
from dataclasses import replace

import pytest

from swarm.errors import InvalidRequestError, UnavailableError
from swarm.job_spec import JobSpec
from swarm.proto.v1 import training_pb2_grpc
from swarm.transport.channels import DATA_MAX_MESSAGE_BYTES, bind, make_server
from swarm.transport.tls import TlsSecurity

from coordinator.jobs import churn, keepers
from node.training.assignment import Assignment, KeptStage, Peer, StateServe, StateSource
from node.training.exchange import Endpoints, PipelinePeerServicer
from node.training.kept import CheckpointKeeper, kept_dir
from node.training.state_copy import StageState, StateServer, obtain_stage_state
from tests.helpers.tls import TestPki

W, K, X = "e" * 32, "f" * 32, "9" * 32  # W: worker of stage 0, K: its keeper (stage 1), X: not assigned
STEP = 20


def _plan(stages: int, replicas: int) -> list[dict]:
    return [{"node_id": f"n{s}{r}", "address": f"h{s}{r}:1", "stage": s, "replica": r, "num_stages": stages,
             "first_layer": 2 * s, "last_layer_excl": 2 * s + 2} for s in range(stages) for r in range(replicas)]


# ----------------------------------------------------------------------------- pure choices
@pytest.mark.timeout(10)
def test_keeper_is_the_next_stages_node_and_never_the_worker_itself():
    assert churn.checkpoint_keepers(_plan(3, 1)) == {"0:0": "n10", "1:0": "n20", "2:0": "n00"}
    # replicas > 0 upload no weights: only replica 0 gets a keeper, still on another stage's node
    assert churn.checkpoint_keepers(_plan(3, 2)) == {"0:0": "n10", "1:0": "n20", "2:0": "n00"}
    assert churn.checkpoint_keepers(_plan(1, 2)) == {"0:0": "n01"}  # one stage: its other replica
    assert churn.checkpoint_keepers(_plan(1, 1)) == {}  # nobody else to keep it
    # one node holding stages 0 and 1: not its own keeper, the stage after takes it
    same = [{**a, "node_id": "n00"} if a["stage"] == 1 else a for a in _plan(3, 1)]
    assert churn.checkpoint_keepers(same) == {"0:0": "n20", "1:0": "n20", "2:0": "n00"}
    out = churn.with_keepers(_plan(2, 1))
    assert out[0]["checkpoint_keeper"] == {"node_id": "n10", "address": "h10:1"}
    assert out[1]["keeps"] == [{"node_id": "n00", "address": "h00:1", "stage": 0, "replica": 0}]


@pytest.mark.timeout(10)
def test_lost_stage_resumes_from_its_keeper_when_the_keeper_is_in_the_new_plan():
    rec = {"keeper": "n10", "first_layer": 0, "last_layer_excl": 2, "weights_sha256": "a" * 64,
           "optimizer_sha256": "b" * 64}
    new = _plan(2, 1)
    new[0] = {**new[0], "node_id": "spare", "address": "s:1"}  # stage 0's node is gone; a spare took it
    src, serves = churn.keeper_sources(bad={0: rec}, new=new, step=STEP)
    assert src[0] == {"node_id": "n10", "address": "h10:1", "stage": 0, "step": STEP, "weights_sha256": "a" * 64,
                      "optimizer_sha256": "b" * 64, "required": True}
    assert src[1] is None and serves == [[], [{"stage": 0, "step": STEP, "node_ids": ["spare"]}]]
    # the keeper left too: no source (the coordinator refuses to resume from this copy)
    gone = [a for a in new if a["node_id"] != "n10"]
    assert churn.keeper_sources(bad={0: rec}, new=gone, step=STEP)[0] == [None]


@pytest.mark.timeout(10)
def test_a_copy_differing_from_its_recorded_hash_or_gone_is_lost(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "weights.safetensors").write_bytes(b"W")
    (d / "optimizer.safetensors").write_bytes(b"O")
    assignments = churn.with_keepers(_plan(2, 1))
    rec = keepers.copy_record(d, assignments, stage=0, replica=0)
    assert rec["keeper"] == "n10" and rec["weights_sha256"] == hashlib.sha256(b"W").hexdigest()
    rows = [{"step": STEP, "dir": str(d), "copy": rec}]
    assert keepers.lost_copies(rows, {0: d}, step=STEP) == {}
    (d / "weights.safetensors").write_bytes(b"corrupt")
    assert keepers.lost_copies(rows, {0: d}, step=STEP) == {0: rec}
    (d / "weights.safetensors").unlink()
    assert keepers.lost_copies(rows, {0: d}, step=STEP) == {0: rec}
    assert keepers.lost_copies([{**rows[0], "copy": {}}], {0: d}, step=STEP) == {}  # recorded before hashes were


@pytest.mark.timeout(10)
def test_resume_point_skips_lost_copies_their_keeper_did_not_report(tmp_path):
    from swarm.clock import FakeClock

    from coordinator.jobs.store import JobStore
    from coordinator.store import Database

    lost = {30: {1: {"keeper": "n00"}}, 20: {1: {"keeper": "n00", "kept": True}}, 10: {}}
    assert keepers.resume_point([30, 20, 10], lost.get) == (20, lost[20])
    assert keepers.resume_point([30, 10], lost.get) == (10, {})
    assert keepers.resume_point([30], lost.get) == (0, {})  # from the start rather than from filler
    assert keepers.kept_stages(_plan(3, 1), "n00") == [2]
    # a keeper's report marks the recorded copy kept
    store = JobStore(Database(tmp_path), FakeClock())
    store.add_checkpoint("j", stage=2, replica=0, step=STEP, final=False, directory="d", copy={"keeper": "n00"})
    store.add_checkpoint("j", stage=1, replica=0, step=STEP, final=False, directory="e", copy={})
    store.mark_kept("j", stages=[1, 2], step=STEP)
    assert [c["copy"] for c in store.checkpoints("j")] == [{}, {"keeper": "n00", "kept": True}]


# ----------------------------------------------------------------------------- over mTLS
def _assignment(node_id: str, *, stage: int, address: str = "127.0.0.1:1", keeper: str | None = K,
                source: StateSource | None = None, attempt: int = 2, resume_step: int = 0) -> Assignment:
    other = Peer(node_id=W if stage else K, address=address)
    return Assignment(job_id="job", attempt=attempt, stage=stage, num_stages=2, replica=0, num_replicas=1,
                      first_layer=2 * stage, last_layer_excl=2 * stage + 2,
                      prev=other if stage == 1 else None, next=other if stage == 0 else None,
                      stage_replicas=(Peer(node_id=node_id, address="me:1"),), spec=JobSpec(steps=100),
                      model_config={}, num_samples=8, dataset_key="k", resume_step=resume_step,
                      state_source=source,
                      checkpoint_keeper=Peer(node_id=keeper, address="k:1") if keeper and stage == 0 else None,
                      keeps=(KeptStage(peer=Peer(node_id=W, address=address), stage=0, replica=0),)
                      if stage == 1 else ())


@pytest.fixture()
def worker(tmp_path):
    """Node W serving its checkpoint of step STEP over mTLS; yields (pki, address, W's checkpoint dir)."""
    pki = TestPki(tmp_path / "ca")
    d = tmp_path / "w" / "training" / "job" / "stage-0-r0" / f"step-{STEP:08d}"
    d.mkdir(parents=True)
    (d / "weights.safetensors").write_bytes(b"W" * 3000)
    (d / "optimizer.safetensors").write_bytes(b"O" * 2000)
    (d / "meta.json").write_text(json.dumps({"step": STEP}))
    box: dict = {}
    srv = make_server(max_message_bytes=DATA_MAX_MESSAGE_BYTES, max_workers=4)
    training_pb2_grpc.add_PipelinePeerServicer_to_server(PipelinePeerServicer(
        Endpoints(), identify=TlsSecurity.peer_identity,
        state_server=StateServer(node_id=W, state_dir=tmp_path / "w", assignment_of=box.get)), srv)
    port = bind(srv, "127.0.0.1", 0, security=pki.node(W))
    srv.start()
    address = f"127.0.0.1:{port}"
    box["job"] = _assignment(W, stage=0, address=address)
    yield pki, address, d
    srv.stop(0)


def _keeper(pki, address, node_id, state_dir) -> CheckpointKeeper:
    return CheckpointKeeper(_assignment(node_id, stage=1, address=address), state_dir=state_dir,
                            security=pki.node(node_id), stop=threading.Event(), timeout_s=2)


@pytest.mark.timeout(60)
def test_keeper_copies_the_checkpoint_and_a_replanned_worker_resumes_from_it(worker, tmp_path):
    pki, address, _ = worker
    keeper = _keeper(pki, address, K, tmp_path / "k")
    try:
        keeper.submit(STEP)
        keeper.wait()
    finally:
        keeper.close()
    d = kept_dir(tmp_path / "k", "job", 0, STEP)
    assert keeper.kept == [(0, STEP)] and (d / "weights.safetensors").read_bytes() == b"W" * 3000
    assert all((d / n).stat().st_mode & 0o777 == 0o600 for n in ("weights.safetensors", "optimizer.safetensors"))
    assert not list(d.parent.glob(".incoming-*"))  # written whole, then renamed
    # the coordinator's copy is lost: the spare taking stage 0 copies the kept files from K, checked
    # against the hashes the coordinator recorded at upload; K serves them only to that spare
    spare = X
    ksrv = make_server(max_message_bytes=DATA_MAX_MESSAGE_BYTES, max_workers=4)
    src = StateSource(peer=Peer(node_id=K, address="?"), stage=0, step=STEP, required=True,
                      weights_sha256=hashlib.sha256(b"W" * 3000).hexdigest(),
                      optimizer_sha256=hashlib.sha256(b"O" * 2000).hexdigest())
    k_assign = {"job": replace(_assignment(K, stage=1, attempt=3, resume_step=STEP),
                               state_serves=(StateServe(stage=0, step=STEP, node_ids=frozenset({spare})),))}
    training_pb2_grpc.add_PipelinePeerServicer_to_server(PipelinePeerServicer(
        Endpoints(), identify=TlsSecurity.peer_identity,
        state_server=StateServer(node_id=K, state_dir=tmp_path / "k", assignment_of=k_assign.get)), ksrv)
    kport = bind(ksrv, "127.0.0.1", 0, security=pki.node(K))
    ksrv.start()
    try:
        src = replace(src, peer=Peer(node_id=K, address=f"127.0.0.1:{kport}"))
        a = _assignment(spare, stage=0, attempt=3, resume_step=STEP, source=src)

        def no_coordinator() -> StageState:
            raise AssertionError("a required source never falls back to the coordinator")

        got = obtain_stage_state(a, node_id=spare, state_dir=tmp_path / "s", security=pki.node(spare),
                                 from_coordinator=no_coordinator, timeout_s=5)
        assert (got.source, got.weights, got.optimizer) == ("peer", b"W" * 3000, b"O" * 2000)
        # the kept copy was tampered with on K's disk: refused (the recorded hash), and no fallback
        (d / "weights.safetensors").write_bytes(b"Z" * 3000)
        with pytest.raises(UnavailableError, match="refusing its copy"):
            obtain_stage_state(a, node_id=spare, state_dir=tmp_path / "s", security=pki.node(spare),
                               from_coordinator=no_coordinator, timeout_s=5)
        # a node the coordinator did not name for it is refused by K
        with pytest.raises(UnavailableError, match="not assigned to copy"):
            obtain_stage_state(_assignment(W, stage=0, attempt=3, resume_step=STEP, source=src), node_id=W,
                               state_dir=tmp_path / "w2", security=pki.node(W), from_coordinator=no_coordinator,
                               timeout_s=5)
    finally:
        ksrv.stop(0)


@pytest.mark.timeout(60)
def test_only_the_named_keeper_may_fetch_a_checkpoint(worker, tmp_path, caplog):
    pki, address, _ = worker
    keeper = _keeper(pki, address, X, tmp_path / "x")  # a swarm certificate, but not W's named keeper
    try:
        keeper.submit(STEP)
        keeper.wait()
    finally:
        keeper.close()
    assert keeper.kept == [] and "is not the checkpoint keeper the coordinator named" in caplog.text
    assert not kept_dir(tmp_path / "x", "job", 0, STEP).exists()
    # a step W has not saved (yet): asked again until the timeout, then given up
    keeper = _keeper(pki, address, K, tmp_path / "k")
    try:
        keeper.submit(STEP + 10)
        keeper.wait()
    finally:
        keeper.close()
    assert keeper.kept == [] and "has not saved step" in caplog.text


@pytest.mark.timeout(10)
def test_server_validates_the_request():
    server = StateServer(node_id=W, state_dir="/nonexistent", assignment_of=lambda job: None)
    with pytest.raises(InvalidRequestError):
        server.files(K, "job", 0, 1, step=-1)
    with pytest.raises(UnavailableError):
        server.files(K, "job", 0, 1, step=STEP)
