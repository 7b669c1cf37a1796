"""A re-planned worker's stage state copied peer to peer (node/training/state_copy.py): the pure
choices (coordinator's source per worker, node's source, hash check) and, in process over TLS, a
real copy from a live replica, a tampered one refused for the coordinator's, a caller the
coordinator did not assign refused."""

import hashlib
from types import SimpleNamespace

import pytest

from swarm.errors import InvalidRequestError
from swarm.job_spec import JobSpec
from swarm.proto.v1 import training_pb2_grpc
from swarm.transport.channels import DATA_MAX_MESSAGE_BYTES, bind, make_server
from swarm.transport.tls import TlsSecurity
from swarm.transport.transfer import FileHeader

from coordinator.jobs import churn
from node.training.assignment import Assignment, Peer, StateServe, StateSource
from node.training.exchange import Endpoints, PipelinePeerServicer
from node.training.state_copy import StageState, StateServer, check_offered, choose_source, obtain_stage_state
from tests.helpers.tls import TestPki

B, C, D = "b" * 32, "c" * 32, "d" * 32  # B: the live replica (source), C: the new one, D: not assigned
STEP = 10


def _old_new() -> tuple[list[dict], list[dict]]:
    old = [{"node_id": n, "address": f"{n[:1]}:1", "stage": s, "replica": r, "first_layer": 2 * s,
            "last_layer_excl": 2 * s + 2} for (n, s, r) in (("x0", 0, 0), (B, 1, 0))]
    new = old + [{"node_id": n, "address": f"{n[:1]}:1", "stage": s, "replica": 1, "first_layer": 2 * s,
                  "last_layer_excl": 2 * s + 2} for (n, s) in (("x1", 0), (C, 1))]
    return old, new


def _copies(*stages, optim="o" * 64) -> dict:
    return {s: {"replica": 0, "weights_sha256": "w" * 64, "optimizer_sha256": optim} for s in stages}


@pytest.mark.timeout(10)
def test_coordinator_names_the_node_holding_the_same_layers_wherever_the_replan_put_it():
    old, new = _old_new()
    src, serves = churn.state_sources(old=old, new=new, copies=_copies(0, 1), step=STEP)
    assert [s["node_id"] for s in src] == ["x0", B, "x0", B]  # survivors too: they load their own copy
    assert src[3] == {"node_id": B, "address": "b:1", "stage": 1, "step": STEP, "weights_sha256": "w" * 64,
                      "optimizer_sha256": "o" * 64}
    assert serves == [[{"stage": 0, "step": STEP, "node_ids": ["x1"]}], [{"stage": 1, "step": STEP, "node_ids": [C]}],
                      [], []]
    # the planner swapped the survivors' stages: each new worker still copies its layers from their holder
    swapped = [{**a, "node_id": {"x0": B, B: "x0"}.get(a["node_id"], a["node_id"]),
                "address": {"x0": "b:1", B: "x:1"}.get(a["node_id"], a["address"])} for a in new]
    src, serves = churn.state_sources(old=old, new=swapped, copies=_copies(0, 1), step=STEP)
    assert [(s["node_id"], s["stage"], s["address"]) for s in src] == [("x0", 0, "x:1"), (B, 1, "b:1")] * 2
    # B, now at stage 0, sends the stage 1 it saved to x0 and C (the new stage-1 workers)
    assert serves[0] == [{"stage": 1, "step": STEP, "node_ids": [C, "x0"]}]
    # no copy for stage 0; no optimizer hash for stage 1 (an old node's checkpoint): the coordinator's
    assert churn.state_sources(old=old, new=new, copies=_copies(1, optim=""), step=STEP)[0] == [None] * 4
    # the re-plan split the layers differently: the coordinator's re-assembled model
    moved = [{**a, "last_layer_excl": 3} if a["stage"] == 1 and a["node_id"] == C else a for a in new]
    assert churn.state_sources(old=old, new=moved, copies=_copies(0, 1), step=STEP)[0][3] is None
    # the uploader is gone from the new plan
    gone = [a for a in new if a["node_id"] != B]
    assert churn.state_sources(old=old, new=gone, copies=_copies(1), step=STEP) == ([None] * 3, [[], [], []])


@pytest.mark.timeout(10)
def test_replica_added_says_peer_only_when_every_added_worker_copied_from_one():
    peer = {"0:1": ("peer", 100), "1:1": ("peer", 50), "1:0": ("local", 0)}
    assert churn.summarize_state_from(peer, ["0:1", "1:1"]) == ("peer", 150)
    assert churn.summarize_state_from({**peer, "1:1": ("coordinator", 70)}, ["0:1", "1:1"]) == ("coordinator", 170)
    assert churn.summarize_state_from({}, ["0:1"]) == ("coordinator", 0)


def _assignment(node_id: str, *, address: str = "127.0.0.1:1", attempt: int = 3, weights=b"W" * 3000,
                optim=b"O" * 2000, resume_step: int = STEP, source: bool = True) -> Assignment:
    src = StateSource(peer=Peer(node_id=B, address=address), stage=1, step=STEP,
                      weights_sha256=hashlib.sha256(weights).hexdigest(),
                      optimizer_sha256=hashlib.sha256(optim).hexdigest()) if source else None
    return Assignment(job_id="job", attempt=attempt, stage=1, num_stages=2, replica=1 if node_id == C else 0,
                      num_replicas=2, first_layer=2, last_layer_excl=4, prev=Peer(node_id="a" * 32, address="x:1"),
                      next=None, stage_replicas=(Peer(node_id=B, address=address), Peer(node_id=C, address="y:1")),
                      spec=JobSpec(steps=100), model_config={}, num_samples=8, dataset_key="k",
                      resume_step=resume_step, state_source=src,
                      state_serves=(StateServe(stage=1, step=STEP, node_ids=frozenset({C})),) if node_id == B else ())


@pytest.mark.timeout(10)
def test_node_takes_local_then_peer_then_coordinator():
    a = _assignment(C)
    hashes = a.state_source.hashes
    assert choose_source(a, node_id=B, local_hashes=hashes) == "local"
    assert choose_source(a, node_id=B, local_hashes=None) == "coordinator"  # the source lost its files
    assert choose_source(a, node_id=C, local_hashes=None) == "peer"
    assert choose_source(a, node_id=C, local_hashes={**hashes, "weights.safetensors": "0" * 64}) == "peer"
    assert choose_source(_assignment(C, source=False), node_id=C, local_hashes=None) == "coordinator"
    with pytest.raises(InvalidRequestError, match="state source is not at its resume step"):
        _assignment(C, resume_step=STEP + 1)


@pytest.mark.timeout(10)
def test_offered_files_must_have_the_coordinators_hashes():
    expected = {"weights.safetensors": "a" * 64}
    check_offered(expected, FileHeader(name="weights.safetensors", size_bytes=1, sha256="a" * 64), peer=B)
    with pytest.raises(InvalidRequestError, match="refusing its copy"):
        check_offered(expected, FileHeader(name="weights.safetensors", size_bytes=1, sha256="b" * 64), peer=B)
    with pytest.raises(InvalidRequestError, match="not one of"):
        check_offered(expected, FileHeader(name="evil.py", size_bytes=1, sha256="a" * 64), peer=B)


@pytest.fixture()
def source(tmp_path):
    """Node B serving its state at STEP over TLS; yields (pki, address, B's state dir, its assignment box)."""
    pki = TestPki(tmp_path / "ca")
    state_dir = tmp_path / "b"
    d = state_dir / "training" / "job" / "stage-1-r0" / f"step-{STEP:08d}"
    d.mkdir(parents=True)
    (d / "weights.safetensors").write_bytes(b"W" * 3000)
    (d / "optimizer.safetensors").write_bytes(b"O" * 2000)
    box: dict = {}
    server = StateServer(node_id=B, state_dir=state_dir, assignment_of=box.get)
    srv = make_server(max_message_bytes=DATA_MAX_MESSAGE_BYTES, max_workers=4)
    training_pb2_grpc.add_PipelinePeerServicer_to_server(
        PipelinePeerServicer(Endpoints(), identify=TlsSecurity.peer_identity, state_server=server), srv)
    port = bind(srv, "127.0.0.1", 0, security=pki.node(B))
    srv.start()
    address = f"127.0.0.1:{port}"
    box["job"] = _assignment(B, address=address)
    yield pki, address, state_dir, d
    srv.stop(0)


def _coordinator_copy(calls: list):
    def fetch() -> StageState:
        calls.append(1)
        return StageState(weights=b"W" * 3000, optimizer=b"O" * 2000, source="coordinator", num_bytes=5000)
    return fetch


@pytest.mark.timeout(30)
def test_new_replica_copies_from_the_live_one_and_refuses_a_tampered_copy(source, tmp_path, caplog):
    pki, address, b_dir, files = source
    calls: list = []
    a = _assignment(C, address=address)
    got = obtain_stage_state(a, node_id=C, state_dir=tmp_path / "c", security=pki.node(C),
                             from_coordinator=_coordinator_copy(calls), timeout_s=10)
    assert (got.source, got.num_bytes, got.weights, got.optimizer) == ("peer", 5000, b"W" * 3000, b"O" * 2000)
    assert not calls and not list((tmp_path / "c").rglob("*.safetensors"))  # nothing left behind
    # the source itself loads its own files
    own = obtain_stage_state(_assignment(B, address=address), node_id=B, state_dir=b_dir, security=pki.node(B),
                             from_coordinator=_coordinator_copy(calls), timeout_s=10)
    assert (own.source, own.num_bytes) == ("local", 0) and not calls
    # a lying source: other weights, announced with their own (correct) digest -> refused, coordinator's copy
    (files / "weights.safetensors").write_bytes(b"X" * 3000)
    got = obtain_stage_state(a, node_id=C, state_dir=tmp_path / "c", security=pki.node(C),
                             from_coordinator=_coordinator_copy(calls), timeout_s=10)
    assert got.source == "coordinator" and got.weights == b"W" * 3000 and calls == [1]
    assert "refusing its copy" in caplog.text and "using the coordinator's copy" in caplog.text
    assert not (tmp_path / "c" / "training" / "job").exists() or \
        not list((tmp_path / "c" / "training" / "job").rglob("*.safetensors"))


@pytest.mark.timeout(30)
def test_only_a_node_assigned_to_the_stage_may_copy_its_state(source, tmp_path, caplog):
    pki, address, _, _ = source
    calls: list = []
    # D holds a certificate of the swarm but no assignment to stage 1: refused, coordinator's copy
    got = obtain_stage_state(_assignment(C, address=address), node_id=D, state_dir=tmp_path / "d",
                             security=pki.node(D), from_coordinator=_coordinator_copy(calls), timeout_s=10)
    assert got.source == "coordinator" and calls == [1] and "was not assigned to copy" in caplog.text
    # an attempt the source has moved past is refused too (no retry)
    got = obtain_stage_state(_assignment(C, address=address, attempt=2), node_id=C, state_dir=tmp_path / "c",
                             security=pki.node(C), from_coordinator=_coordinator_copy(calls), timeout_s=10)
    assert got.source == "coordinator" and calls == [1, 1]


@pytest.mark.timeout(10)
def test_growth_keeps_every_running_worker_in_place_and_adds_pipelines_on_the_same_split():
    from swarm.errors import InfeasiblePlanError
    from swarm.scheduling.plan import Plan, PlanStage

    from coordinator.jobs.planning import grow_plan
    from tests.unit.training.test_job_shape_events import _node

    nodes = {n.id: n for n in (_node(i) for i in range(6))}
    plan = Plan(stages=(PlanStage(layers=(0, 1), devices=("node3",)), PlanStage(layers=(1, 4), devices=("node0",))),
                objective="dtfm_comm", cost_s=1.0, dp_s=0.0, pp_s=0.0)
    idle = [nodes[i] for i in ("node1", "node2", "node4", "node5")]
    spec = JobSpec(batch_size=4, micro_batch_size=2, seq_len=16, num_replicas=2)
    jp = grow_plan(plan, idle, nodes, num_replicas=2, spec=spec)
    assert [st.devices for st in jp.plan.stages] == [("node3", "node2"), ("node0", "node1")]  # heavy stage first
    by = {(a["stage"], a["replica"]): a for a in jp.assignments}
    assert by[(0, 0)]["node_id"] == "node3" and by[(1, 0)]["node_id"] == "node0"  # nobody moved
    assert (by[(1, 1)]["first_layer"], by[(1, 1)]["last_layer_excl"]) == (1, 4)
    assert by[(0, 1)]["next"]["node_id"] == "node1" and len(by[(1, 1)]["stage_replicas"]) == 2
    with pytest.raises(InfeasiblePlanError):
        grow_plan(plan, idle[:1], nodes, num_replicas=2, spec=spec)
    with pytest.raises(InfeasiblePlanError):  # 4 samples do not split into 3 replicas of 2
        grow_plan(plan, idle, nodes, num_replicas=3, spec=spec)


@pytest.mark.timeout(10)
def test_replica_added_event_waits_for_the_start_and_says_where_the_state_came_from(tmp_path):
    from coordinator.jobs.handover import AddedReplicas, state_copies

    class Store:
        def __init__(self):
            self.events = []

        def add_event(self, job_id, kind, message, **fields):
            self.events.append((job_id, kind, fields))

    store = Store()
    added = AddedReplicas(store)
    job = SimpleNamespace(id="j", attempt=3, resume_step=STEP, assignments=[
        {"node_id": n, "stage": s, "replica": r, "num_replicas": 2, "added": r == 1}
        for n, s, r in (("x0", 0, 0), (B, 1, 0), ("x1", 0, 1), (C, 1, 1))])
    added.ready("j", 3, "1:1", state_from="peer", state_bytes=5000)
    added.ready("j", 3, "1:0", state_from="local", state_bytes=0)
    added.ready("j", 3, "0:1", state_from="peer", state_bytes=7000)
    added.started(SimpleNamespace(id="j", attempt=2, resume_step=5, assignments=[{**a, "added": False}
                                                                                 for a in job.assignments]), optim="")
    assert store.events == []  # an attempt that added nobody
    added.started(job, optim="with its optimizer state")
    (job_id, kind, fields), = store.events
    assert (job_id, kind, fields["state_from"], fields["state_bytes"]) == ("j", "replica_added", "peer", 12000)
    assert fields["added"] == sorted([C, "x1"]) and fields["num_replicas"] == 2 and fields["resume_step"] == STEP
    assert fields["state_sources"] == [{"worker": "0:1", "state_from": "peer", "bytes": 7000},
                                       {"worker": "1:1", "state_from": "peer", "bytes": 5000}]
    # a coordinator restarted before the start fence heard no report yet: the coordinator's copy is assumed
    AddedReplicas(store).started(job, optim="")
    assert store.events[-1][2]["state_from"] == "coordinator"
    # the hashes a copy must match are those of the coordinator's copy, from the replica that sent it
    d = tmp_path / "step-10" / "stage-1-r1"
    d.mkdir(parents=True)
    (d / "weights.safetensors").write_bytes(b"w")
    (d / "optimizer.safetensors").write_bytes(b"o")
    rows = [{"dir": str(d), "step": STEP, "replica": 1}]
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    assert state_copies(rows, {1: d}, step=STEP) == {1: {"replica": 1, "weights_sha256": sha(b"w"),
                                                         "optimizer_sha256": sha(b"o")}}
    (d / "optimizer.safetensors").unlink()  # an old node's upload without optimizer state: no peer copy
    assert state_copies(rows, {1: d}, step=STEP) == {}
