"""Scoped credentials on the gRPC port (issue 11): the join token joins, the admin token changes
what the swarm runs, the read token reads; rotation without a restart; tokens on disk."""

from __future__ import annotations

import os
import stat

import grpc
import pytest

from coordinator import credentials
from coordinator.app import CoordinatorApp, CoordinatorConfig
from coordinator.cli import main as coordinator_main
from swarm import certs
from swarm.errors import AuthError, ConfigError, PermissionDeniedError
from swarm.identity import Identity
from swarm.inference.sampling import SamplingParams
from swarm.localswarm import wait_until
from swarm.proto.v1 import coordinator_pb2 as cpb
from swarm.proto.v1 import coordinator_pb2_grpc as cpb_grpc
from swarm.proto.v1 import inference_pb2 as ipb
from swarm.proto.v1 import inference_pb2_grpc as ipb_grpc
from swarm.proto.v1 import training_pb2 as tpb
from swarm.proto.v1 import training_pb2_grpc as tpb_grpc
from swarm.transport.auth import api_token_metadata
from swarm.transport.coordinator_client import CoordinatorClient
from tests.helpers.foundation import inprocess_coordinator, inprocess_node, make_register
from tests.helpers.tls import app_channel

pytestmark = pytest.mark.timeout(60)
PLUGINS = ("coordinator.jobs", "coordinator.inference")


def _code(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value.code(), info.value.details()


def _client(app, token) -> CoordinatorClient:
    return CoordinatorClient(f"127.0.0.1:{app.grpc_port}", token=token, ca_pem=app.ca.ca_pem)


def test_three_tokens_pin_one_ca_and_are_kept_private(tmp_path):
    with inprocess_coordinator(tmp_path / "c") as app:
        tokens = {"join": app.join_token, "admin": app.admin_token, "read": app.read_token}
        parsed = {k: certs.parse_token(t) for k, t in tokens.items()}
        assert {p.fingerprint for p in parsed.values()} == {app.ca.fingerprint}  # each one pins the CA
        assert len({p.secret for p in parsed.values()}) == 3
        for kind, name in credentials.TOKEN_FILES.items():
            path = app.state_dir / name
            assert path.read_text().strip() == tokens[kind]
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # kept across restarts; given secrets (bare or the full token pasted back) win
    with inprocess_coordinator(tmp_path / "c", admin_token="admin-secret-0123456789",
                               read_token=tokens["read"]) as app:
        assert app.join_token == tokens["join"] and app.read_token == tokens["read"]
        assert app.admin_token == certs.format_token(app.ca.fingerprint, "admin-secret-0123456789")
    with pytest.raises(ConfigError, match="must differ"):
        CoordinatorApp(CoordinatorConfig(state_dir=tmp_path / "c", join_token="same-secret-0123456789",
                                         read_token="same-secret-0123456789"))


def test_admin_calls_refuse_the_read_and_join_tokens_with_advice(tmp_path):
    with inprocess_coordinator(tmp_path / "c", plugins=PLUGINS) as app:
        ch = app_channel(app)
        training, gateway = tpb_grpc.TrainingStub(ch), ipb_grpc.InferenceGatewayStub(ch)
        calls = [
            lambda md: training.CancelJob(tpb.CancelJobRequest(job_id="abc"), metadata=md, timeout=10),
            lambda md: training.ResumeJob(tpb.ResumeJobRequest(job_id="abc"), metadata=md, timeout=10),
            lambda md: training.SubmitJob(iter([tpb.SubmitJobChunk()]), metadata=md, timeout=10),
            lambda md: gateway.Unserve(ipb.ServeUnserveRequest(name="m"), metadata=md, timeout=10),
            lambda md: gateway.UploadModel(iter([ipb.ServeUploadChunk()]), metadata=md, timeout=10),
        ]
        for call in calls:
            for token in (app.read_token, app.join_token):  # the nodes' token cannot submit jobs
                code, details = _code(call, api_token_metadata(token))
                assert code == grpc.StatusCode.PERMISSION_DENIED
                assert "admin token printed as admin_token=" in details, details
            code, details = _code(call, ())
            assert code == grpc.StatusCode.UNAUTHENTICATED and "no token was given" in details
        # the admin token passes the check (the request itself is then judged)
        assert _code(calls[0], api_token_metadata(app.admin_token))[0] == grpc.StatusCode.NOT_FOUND
        with _client(app, app.read_token) as client, pytest.raises(PermissionDeniedError, match="admin_token="):
            client.cancel_job("abc")
        ch.close()


def test_reads_need_the_read_or_admin_token_unless_public(tmp_path):
    ident = Identity.from_seed(b"reader-test")
    with inprocess_coordinator(tmp_path / "c", plugins=PLUGINS) as app:
        ch = app_channel(app)
        cpb_grpc.CoordinatorStub(ch).Register(make_register(app, ident), timeout=10)
        reads = [
            lambda md: cpb_grpc.CoordinatorStub(ch).ListNodes(cpb.ListNodesRequest(), metadata=md, timeout=10),
            lambda md: cpb_grpc.CoordinatorStub(ch).GetNetwork(cpb.GetNetworkRequest(), metadata=md, timeout=10),
            lambda md: tpb_grpc.TrainingStub(ch).ListJobs(tpb.ListJobsRequest(), metadata=md, timeout=10),
            lambda md: ipb_grpc.InferenceGatewayStub(ch).ListModels(ipb.ServeListModelsRequest(), metadata=md,
                                                                     timeout=10),
        ]
        for read in reads:
            code, details = _code(read, ())
            assert code == grpc.StatusCode.UNAUTHENTICATED and "read_token=" in details, details
            code, details = _code(read, api_token_metadata(app.join_token))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "join token lets nodes join" in details
            read(api_token_metadata(app.read_token))
            read(api_token_metadata(app.admin_token))
        with _client(app, app.read_token) as client:
            assert [n.peer_address for n in client.snapshot().nodes] != [""]
        with _client(app, f"swarm1.{app.ca.fingerprint}") as client:  # pins, grants nothing
            with pytest.raises(AuthError, match="needs the coordinator's read token"):
                client.snapshot()
        ch.close()
    with inprocess_coordinator(tmp_path / "p", plugins=PLUGINS, public_status=True) as app:
        with app_channel(app) as ch:
            cpb_grpc.CoordinatorStub(ch).Register(make_register(app, ident), timeout=10)
        with _client(app, f"swarm1.{app.ca.fingerprint}") as client:
            nodes = client.snapshot().nodes
            assert [n.id for n in nodes] == [ident.node_id] and nodes[0].peer_address == ""  # never public
            assert client.list_jobs() == [] and client.list_models() == []
            with pytest.raises(AuthError, match="generating needs the coordinator's read or admin token"):
                list(client.generate(model="m", prompt="x", params=SamplingParams(max_new_tokens=1)))
        with _client(app, app.read_token) as client:
            assert client.snapshot().nodes[0].peer_address != ""


def test_rotation_refuses_the_old_token_without_a_restart_and_keeps_sessions(tmp_path):
    with inprocess_coordinator(tmp_path / "c", plugins=PLUGINS) as app, \
            inprocess_node(app, tmp_path / "n0") as agent:
        old = {"join": app.join_token, "admin": app.admin_token, "read": app.read_token}
        for kind in ("admin", "read", "join"):
            assert coordinator_main(["rotate-token", "--state-dir", str(app.state_dir), "--kind", kind]) == 0
            new = (app.state_dir / credentials.TOKEN_FILES[kind]).read_text().strip()
            assert new != old[kind] and certs.parse_token(new).fingerprint == app.ca.fingerprint
            assert app.token_kind(old[kind]) is None and app.token_kind(new) == kind
        with _client(app, old["read"]) as client, pytest.raises(AuthError, match="not this coordinator's read"):
            client.snapshot()
        with _client(app, old["admin"]) as client, pytest.raises(AuthError, match="the token given is wrong"):
            client.cancel_job("abc")
        with app_channel(app) as ch:
            code, details = _code(cpb_grpc.CoordinatorStub(ch).Register,
                                  make_register(app, Identity.from_seed(b"late"), token=old["join"]), timeout=10)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "rotated" in details
        with _client(app, app.read_token) as client:  # the node registered before keeps its session
            seen = client.snapshot().nodes[0].last_seen_at_s
            wait_until(lambda: client.snapshot().nodes[0].last_seen_at_s > seen, 10, message="heartbeats go on")
            assert client.snapshot().nodes[0].state == "online"
        assert agent.node_id == app.registry.snapshot()[0].id
    # the rotated tokens are what the next start uses
    with inprocess_coordinator(tmp_path / "c") as app:
        assert app.token_kind(old["admin"]) is None
        assert app.admin_token == (tmp_path / "c" / "admin_token").read_text().strip()


def test_rotate_token_refuses_a_dir_without_state(tmp_path, capsys):
    assert coordinator_main(["rotate-token", "--state-dir", str(tmp_path / "nothing"), "--kind", "read"]) == 2
    assert "holds no coordinator state" in capsys.readouterr().err
