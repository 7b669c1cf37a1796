"""Adversarial tests over real processes and TLS (issue 11 items 1-2).

- plaintext clients get no answer from the coordinator's or a node's gRPC port;
- a token with another CA fingerprint is refused by the node ("someone in the middle"), an old
  plain token says which token to use;
- certificates from another CA, or none, fail the handshake on a node's port;
- a registered node with a valid certificate that is not the assigned neighbour cannot get a
  tensor accepted by a stage of a running job (nor impersonate the neighbour), cannot LoadStage
  or probe; the job finishes;
- a node's certificate is renewed over heartbeats and its peer server serves the new one.
"""

from __future__ import annotations

import socket
import ssl
import time

import grpc
import pytest
import torch

from swarm import certs
from swarm.cli.train import upload_files
from swarm.compression import CodecSpec
from swarm.errors import AuthError
from swarm.job_spec import JobSpec
from swarm.proto.v1 import coordinator_pb2 as cpb
from swarm.proto.v1 import coordinator_pb2_grpc as cpb_grpc
from swarm.proto.v1 import inference_pb2 as ipb
from swarm.proto.v1 import inference_pb2_grpc as ipb_grpc
from swarm.proto.v1 import peer_pb2 as ppb
from swarm.proto.v1 import peer_pb2_grpc as ppb_grpc
from swarm.proto.v1 import training_pb2_grpc
from swarm.transport import tensors as wt
from swarm.transport.channels import data_channel
from swarm.transport.coordinator_client import CoordinatorClient
from swarm.transport.tls import MISMATCH, TlsSecurity
from tests.helpers.procs import (FAST_COORDINATOR_ARGS, coordinator_proc, launch_node, node_proc, nodes_proc,
                                 wait_until)
from tests.helpers.tls import TestPki, security_from_state_dir
from tests.multiproc.training._common import write_inputs

pytestmark = pytest.mark.multiproc


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details() or ""


def _online(coord, n: int) -> None:
    wait_until(lambda: sum(x.state == "online" for x in coord.snapshot().nodes) == n, 30, message=f"{n} nodes online")


@pytest.mark.timeout(60)
def test_plaintext_and_foreign_certificates_get_nothing(tmp_path):
    with coordinator_proc(tmp_path / "coord") as coord, node_proc(coord, tmp_path / "n0") as n0:
        _online(coord, 1)
        node_address = f"127.0.0.1:{n0.port}"
        # plaintext: the handshake fails on both ports (no status from the servicers)
        with grpc.insecure_channel(coord.address) as ch:
            code, _ = _code(lambda: cpb_grpc.CoordinatorStub(ch).ListNodes(cpb.ListNodesRequest(), timeout=3))
            assert code == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(node_address) as ch:
            code, _ = _code(lambda: ppb_grpc.PeerStub(ch).Ping(ppb.PingRequest(payload=b"x"), timeout=3))
            assert code == grpc.StatusCode.UNAVAILABLE
        # raw bytes on the ports: nothing but a TLS alert / a closed connection comes back
        for port in (coord.port, n0.port):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 64)
                s.settimeout(2)
                try:
                    reply = s.recv(4096)
                except OSError:
                    reply = b""
                assert b"grpc" not in reply.lower() and b"swarm" not in reply.lower()
        # a client certificate from another CA, or none at all: the node's port refuses the handshake
        other = TestPki(tmp_path / "other-ca")
        ours = security_from_state_dir(coord.state_dir, "f" * 32)  # a valid swarm certificate, for contrast
        for sec, ok in ((other.node("f" * 32), False), (TlsSecurity(ca_pem=ours.ca_pem), False), (ours, True)):
            with data_channel(node_address, security=sec, node_id=n0.node_id) as ch:
                if ok:
                    assert ppb_grpc.PeerStub(ch).Ping(ppb.PingRequest(payload=b"x"), timeout=5).node_id == n0.node_id
                else:
                    code, _ = _code(lambda: ppb_grpc.PeerStub(ch).Ping(ppb.PingRequest(payload=b"x"), timeout=3))
                    assert code == grpc.StatusCode.UNAVAILABLE
        # a client that trusts another CA does not accept the coordinator (nor the node) as server
        with data_channel(node_address, security=other.node("e" * 32)) as ch:
            code, _ = _code(lambda: ppb_grpc.PeerStub(ch).Ping(ppb.PingRequest(payload=b"x"), timeout=3))
            assert code == grpc.StatusCode.UNAVAILABLE
        # a node certificate does not pass for the coordinator: the name check fails
        with data_channel(node_address, security=ours, node_id="d" * 32) as ch:
            code, _ = _code(lambda: ppb_grpc.PeerStub(ch).Ping(ppb.PingRequest(payload=b"x"), timeout=3))
            assert code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.timeout(60)
def test_wrong_fingerprint_or_old_token_is_refused_with_advice(tmp_path):
    with coordinator_proc(tmp_path / "coord") as coord:
        secret = coord.token.rsplit(".", 1)[1]
        wrong = certs.format_token("0" * 64, secret)  # the right secret, another CA: an impostor's
        # READY comes only after registration, which these never reach: wait for STARTED
        node = launch_node(coord, tmp_path / "mitm", token=wrong, wait_for="STARTED")
        try:
            node.proc.proc.wait(timeout=30)
            assert node.proc.proc.returncode == 1
            assert MISMATCH in node.proc.log_tail()
        finally:
            node.proc.stop()
        old = launch_node(coord, tmp_path / "old", token=secret, wait_for="STARTED")  # a pre-TLS plain secret
        try:
            old.proc.proc.wait(timeout=30)
            assert old.proc.proc.returncode == 1
            assert "use the token the coordinator prints" in old.proc.log_tail()
        finally:
            old.proc.stop()
        assert coord.snapshot().nodes == ()
        assert not (tmp_path / "mitm" / "coordinator_ca.pem").exists()  # nothing pinned, nothing sent
        with CoordinatorClient(coord.address, token=wrong) as client, pytest.raises(AuthError, match="someone in the middle"):
            client.snapshot()


def _spec(steps: int) -> JobSpec:
    return JobSpec(steps=steps, batch_size=4, micro_batch_size=2, seq_len=16, lr=1e-3, codec=CodecSpec.parse("none"),
                   checkpoint_every=0, num_stages=3, num_replicas=1, peer_timeout_s=15.0, schedule="1f1b")


@pytest.mark.timeout(150)
def test_only_the_assigned_neighbour_may_push_and_the_job_finishes(tmp_path):
    model, data = write_inputs(tmp_path)
    with coordinator_proc(tmp_path / "coord") as coord, nodes_proc(coord, [tmp_path / f"n{i}" for i in range(4)]):
        _online(coord, 4)
        with coord.client() as client:
            job = client.submit_job(_spec(40), upload_files(model, data))
        detail = lambda: coord.get_json(f"/api/jobs/{job.id}")  # noqa: E731
        d = wait_until(lambda: (x := detail())["state"] == "running" and (x["step"] or 0) >= 1 and x, 60,
                       message="the job runs")
        by_stage = {a["stage"]: a["node_id"] for a in d["assignments"]}
        addresses = {n.id: n.peer_address for n in coord.snapshot().nodes}
        outsider = next(i for i in addresses if i not in by_stage.values())  # registered, not in the job
        stage1 = addresses[by_stage[1]]
        sec = security_from_state_dir(coord.state_dir, outsider)  # the outsider's valid certificate

        ids = tuple(int(i) for i in d.get("sample_ids", ())) or None
        good = torch.zeros(2, 16, 32)
        payload = wt.raw_encode(good)

        def push(sender_id: str, step: int):
            header = wt.make_header(payload, job_id=job.id, step=step, micro_batch=0, sample_ids=ids or (0, 1),
                                    shape=(2, 16, 32), dtype="float32", codec="none", kind="activation", boundary=0,
                                    sender_id=sender_id, replica=0, attempt=d.get("attempt", 0))
            with data_channel(stage1, security=sec, node_id=by_stage[1]) as ch:
                return _code(lambda: training_pb2_grpc.PipelinePeerStub(ch).PushTensor(
                    wt.to_chunks(wt.WireTensor(header=header, payload=payload)), timeout=10))

        step_now = detail()["step"] or 0
        for sender_id in (outsider, by_stage[0]):  # in its own name, then in stage 0's
            for step in (step_now, step_now + 1):
                code, details = push(sender_id, step)
                assert code == grpc.StatusCode.PERMISSION_DENIED, details
                assert outsider[:12] in details
        # the outsider may not place stages either, nor probe a node it holds no task towards
        with data_channel(stage1, security=sec, node_id=by_stage[1]) as ch:
            code, details = _code(lambda: ipb_grpc.InferenceStageStub(ch).LoadStage(ipb.ServeLoadStageRequest(
                assignment=ipb.ServeStageAssignment(model_name="m", model_digest="d" * 64, num_stages=1,
                                                    last_layer_excl=1, max_seq_len=8, max_sessions=1)), timeout=10))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "coordinator only" in details
            stranger = security_from_state_dir(coord.state_dir, "f" * 32)
        with data_channel(stage1, security=stranger, node_id=by_stage[1]) as ch:
            code, details = _code(lambda: ppb_grpc.PeerStub(ch).BandwidthProbe(
                iter([ppb.ProbeChunk(data=b"x" * 1024)] * 4), timeout=10))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "measurement task" in details
        # nothing forged was taken: the job runs to its end
        d = wait_until(lambda: (x := detail())["state"] in ("succeeded", "failed") and x, 120, message="job ends")
        assert d["state"] == "succeeded", d["reason"]


def _served_certificate(address: str, sec: TlsSecurity, tmp_path):
    """The certificate a node's peer port presents now (handshake with a swarm client certificate)."""
    from cryptography import x509

    (tmp_path / "c.pem").write_bytes(sec.cert_pem)
    (tmp_path / "k.pem").write_bytes(sec._material()[1])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=sec.ca_pem.decode())
    ctx.check_hostname = False
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    ctx.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


@pytest.mark.timeout(60)
def test_node_certificate_is_renewed_and_served(tmp_path):
    args = [*FAST_COORDINATOR_ARGS, "--node-cert-lifetime-s", "4"]
    with coordinator_proc(tmp_path / "coord", extra_args=args) as coord, node_proc(coord, tmp_path / "n0") as n0:
        _online(coord, 1)
        address = f"127.0.0.1:{n0.port}"
        sec = security_from_state_dir(coord.state_dir, "f" * 32)
        first = _served_certificate(address, sec, tmp_path)
        assert certs.identity_from_uris(
            first.extensions.get_extension_for_class(__import__("cryptography").x509.SubjectAlternativeName)
            .value.get_values_for_type(__import__("cryptography").x509.UniformResourceIdentifier)) == n0.node_id
        expires = first.not_valid_after_utc.timestamp()
        # past half its lifetime a heartbeat brings a new certificate; the peer port serves it
        renewed = wait_until(lambda: (c := _served_certificate(address, sec, tmp_path)).serial_number
                             != first.serial_number and c, 15, message="a renewed certificate is served")
        assert renewed.not_valid_after_utc.timestamp() > expires
        wait_until(lambda: time.time() > expires + 0.5, 10, message="the first certificate expired")
        with data_channel(address, security=sec, node_id=n0.node_id) as ch:
            assert ppb_grpc.PeerStub(ch).Ping(ppb.PingRequest(payload=b"x"), timeout=5).node_id == n0.node_id
        assert coord.snapshot().nodes[0].state == "online"
