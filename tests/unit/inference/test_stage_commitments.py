"""In-process gRPC: stages commit to what they computed (``commit_session_ids``), a stage at
``SWARM_FAULT=wrong-tokens=1`` alters its output, and the coordinator's recomputation (Referee)
judges the chain: the faulty stage is blamed, the honest one is not."""

from __future__ import annotations

import pytest

from coordinator.inference.checks import Referee
from node.inference.servicer import InferenceStageServicer
from swarm.faults import FaultConfig
from swarm.inference.params import SamplingParams
from swarm.inference.verify import SKETCH_DIM, ChainResult, StageCommit, judge
from swarm.proto.v1 import inference_pb2 as pb
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.transport.channels import DATA_MAX_MESSAGE_BYTES, bind, data_channel, make_server
from swarm.transport.inference import commitments_from_pb
from swarm.transport.inference_shards import serve_shard
from tests.unit.inference.test_stage_service import _coord, _node_sec, assignment, ckpt, entry  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def _server(tmp_path, name, d, faults=FaultConfig()):
    sec = _node_sec(tmp_path, name)
    sv = InferenceStageServicer(security=sec, node_id=name * 8, device="cpu", state_dir=tmp_path / name,
                                open_coordinator_shard=lambda req: serve_shard(d, req), faults=faults)
    server = make_server(max_message_bytes=DATA_MAX_MESSAGE_BYTES, max_workers=4)
    pb_grpc.add_InferenceStageServicer_to_server(sv, server)
    port = bind(server, "127.0.0.1", 0, security=sec)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("faulty", [False, True])
def test_commitments_and_the_recomputation_blame_only_an_altering_stage(tmp_path, ckpt, faulty):
    d, cfg = ckpt
    faults = FaultConfig(wrong_tokens=1.0) if faulty else FaultConfig()
    s1, a1 = _server(tmp_path, "b", d, faults)
    s0, a0 = _server(tmp_path, "a", d)
    try:
        with data_channel(a0, security=_coord(tmp_path)) as c0, data_channel(a1, security=_coord(tmp_path)) as c1:
            st0, st1 = pb_grpc.InferenceStageStub(c0), pb_grpc.InferenceStageStub(c1)
            st1.LoadStage(pb.ServeLoadStageRequest(assignment=assignment(1, 2, 2, 3)), timeout=30)
            st0.LoadStage(pb.ServeLoadStageRequest(assignment=assignment(0, 2, 0, 2, a1)), timeout=30)
            prompt = [3, 1, 4, 1, 5]
            reply = st0.Step(pb.ServeStepRequest(model_name="m", replica=0, stage=0, entries=[entry("s", 0, prompt)],
                                                 commit_session_ids=["s"]), timeout=30)
            commits = commitments_from_pb(reply, ["s"], 2)["s"]
            assert [len(c[1]) for c in commits] == [SKETCH_DIM, SKETCH_DIM]
            assert commits[0][0] == () and len(commits[1][0]) == SKETCH_DIM  # stage 0 received tokens, not a hidden state
            chain = ChainResult(replica=0, token=int(reply.token_ids[0]), stages=(
                StageCommit(node_id="a" * 8, first_layer=0, last_layer_excl=2, input=commits[0][0], output=commits[0][1]),
                StageCommit(node_id="b" * 8, first_layer=2, last_layer_excl=3, input=commits[1][0], output=commits[1][1])))
            ref = Referee().reference(d, "d" * 64, num_layers=cfg.num_layers, boundaries={2}, context=tuple(prompt),
                                      params=SamplingParams())
            j = judge(chain, ref)
            if faulty:
                assert not j.ok and j.guilty == "b" * 8 and "stage 1" in j.reason
            else:
                assert j.ok, j.reason
            # no commitments unless asked
            plain = st0.Step(pb.ServeStepRequest(model_name="m", replica=0, stage=0,
                                                 entries=[entry("s", 5, [int(reply.token_ids[0])])]), timeout=30)
            assert not plain.commitments
    finally:
        s0.stop(None)
        s1.stop(None)


def test_one_replay_commits_to_every_sampled_row_as_the_decode_steps_did(tmp_path, ckpt):
    """A replay prefill with ``commit_points`` gives, at each sampled row, the commitments and
    the token the serving chain gave at that row's decode step (checks.py: one replay, many checks)."""
    from swarm.inference.verify import agree
    from swarm.transport.inference import point_commitments_from_pb

    d, _ = ckpt
    s1, a1 = _server(tmp_path, "b", d)
    s0, a0 = _server(tmp_path, "a", d)
    try:
        with data_channel(a0, security=_coord(tmp_path)) as c0, data_channel(a1, security=_coord(tmp_path)) as c1:
            st0, st1 = pb_grpc.InferenceStageStub(c0), pb_grpc.InferenceStageStub(c1)
            st1.LoadStage(pb.ServeLoadStageRequest(assignment=assignment(1, 2, 2, 3)), timeout=30)
            st0.LoadStage(pb.ServeLoadStageRequest(assignment=assignment(0, 2, 0, 2, a1)), timeout=30)

            def chain(commits, token):
                return ChainResult(replica=0, token=token, stages=tuple(
                    StageCommit(node_id=n * 8, first_layer=f, last_layer_excl=l, input=c[0], output=c[1])
                    for n, f, l, c in (("a", 0, 2, commits[0]), ("b", 2, 3, commits[1]))))

            ids, served = [3, 1, 4, 1, 5], {}
            for k in range(6):  # prefill, then decode steps; every step commits (as while checks are on)
                e = entry("s", 0, ids) if k == 0 else entry("s", len(ids) - 1, [ids[-1]])
                reply = st0.Step(pb.ServeStepRequest(model_name="m", replica=0, stage=0, entries=[e],
                                                     commit_session_ids=["s"]), timeout=30)
                tok = int(reply.token_ids[0])
                served[len(ids) - 1] = chain(commitments_from_pb(reply, ["s"], 2)["s"], tok)
                ids.append(tok)
            points = [4, 6, 9]  # sampled steps: the rows their decode steps ended at
            replay = st0.Step(pb.ServeStepRequest(
                model_name="m", replica=0, stage=0, entries=[entry("r", 0, ids[:10], reset=True)],
                commit_session_ids=["r"], commit_points=[pb.ServeCommitPoints(session_id="r", positions=points + [99])]),
                timeout=30)
            got = point_commitments_from_pb(replay, "r", points, 2)
            for p in points:
                commits, tok = got[p]
                assert tok == served[p].token
                assert agree(served[p], chain(commits, tok)), p
            # the replay's own last row is still committed the ordinary way
            assert len(commitments_from_pb(replay, ["r"], 2)["r"][1][1]) == SKETCH_DIM
    finally:
        s0.stop(None)
        s1.stop(None)
