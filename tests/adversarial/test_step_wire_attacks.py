"""Attacks on the step wire of real serving nodes, while an honest generation streams through them:
a node with a valid swarm certificate (but no place in the chain) floods the first stage's wire
with connections that never finish their handshake, then sends garbage frames, a step with a
forged capability and a step with no capability. Every attack is refused; the honest stream gets
every token, the same as one process, and a request started during the flood still completes
(the chain's links opened before the flood keep working; a link opened while the slots are held
would fall back to gRPC, tests/unit/inference/test_step_wire.py)."""

from __future__ import annotations

import socket
import threading

import pytest
from tokenizers import Tokenizer

from swarm.certs import node_dns
from swarm.inference.sampling import SamplingParams
from swarm.model.testing import make_tiny_checkpoint
from swarm.proto.v1 import inference_pb2 as pb
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.transport.channels import data_channel
from swarm.transport.inference import new_step_capability
from swarm.transport.step_wire import ERROR, HEADER, HELLO, MAX_CONNECTIONS, READY, STEP, read_frame
from tests.helpers.procs import generate_events, nodes_proc, wait_until
from tests.helpers.tls import security_from_state_dir
from tests.multiproc.inference.test_pipeline_generation import coordinator, reference

pytestmark = pytest.mark.multiproc

PROMPT = "The swarm pools volunteer GPUs over ordinary links"
ROGUE = "f" * 32


def _collect(coord, params, out: dict, key: str) -> None:
    try:
        out[key] = [t for ev in generate_events(coord, model="tiny", prompt=PROMPT, params=params, timeout_s=90)
                    for t in ev.token_ids]
    except Exception as exc:  # noqa: BLE001 -- reported by the test
        out[key] = exc


def _hello(sock, metadata) -> tuple[int, bytes] | None:
    import json

    body = json.dumps({"metadata": metadata}).encode()
    sock.sendall(HEADER.pack(len(body), HELLO) + body)
    return read_frame(sock)


@pytest.mark.timeout(180)
def test_wire_attacks_are_refused_and_the_honest_stream_carries_on(tmp_path):
    d = tmp_path / "ckpt"
    make_tiny_checkpoint(d, "llama", num_layers=4, hidden_size=64, num_heads=4, seed=3)
    greedy = SamplingParams(max_new_tokens=60, temperature=0.0)
    want = reference(d, Tokenizer.from_file(str(d / "tokenizer.json")).encode(PROMPT).ids, greedy, None)
    with coordinator(tmp_path) as coord, nodes_proc(coord, [tmp_path / "n0", tmp_path / "n1"]) as (n0, n1):
        wait_until(lambda: len([n for n in coord.snapshot().nodes if n.state == "online"]) == 2, timeout_s=30)
        info = coord.serve(d, name="tiny", num_replicas=1, num_stages=2, max_seq_len=128)
        first = {n0.node_id: n0, n1.node_id: n1}[info["replicas"][0]["stages"][0]["node_id"]]
        rogue = security_from_state_dir(coord.state_dir, ROGUE)  # a registered node's certificate
        with data_channel(f"127.0.0.1:{first.port}", security=rogue, node_id=first.node_id) as ch:
            port = pb_grpc.InferenceStageStub(ch).StepWire(pb.ServeStepWireRequest(), timeout=10).port
        assert port > 0

        out: dict = {}
        honest = threading.Thread(target=_collect, args=(coord, greedy, out, "during"), daemon=True)
        honest.start()

        # 1. hold every connection slot with TCP connections that never start TLS
        held = []
        for _ in range(MAX_CONNECTIONS + 8):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        # a request started while the slots are held still gets its tokens
        flood = threading.Thread(target=_collect, args=(coord, greedy, out, "flood"), daemon=True)
        flood.start()
        flood.join(90)
        for s in held:
            s.close()

        ctx = rogue.ssl_context(server=False)

        def tls():
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            return ctx.wrap_socket(raw, server_hostname=node_dns(first.node_id))

        # 2. garbage where frames belong: an error frame, the connection closed
        s = tls()
        s.sendall(b"\x00" * 4 + b"\x09garbage")
        frame = read_frame(s)
        assert frame is not None and frame[0] == ERROR and b"INVALID_ARGUMENT" in frame[1], frame
        s.close()
        # 3. a step with a forged capability, and one with none: refused like StepStream refuses
        # them, on the caller first (a node that is not the chain's previous stage)
        step = pb.ServeStepRequest(model_name="tiny", replica=0, stage=0, entries=[
            pb.ServeSessionEntry(session_id="x", start_position=0, num_tokens=1, token_ids=[1])]).SerializeToString()
        for metadata in ([["swarm-step-capability", new_step_capability()]], []):
            s = tls()
            assert _hello(s, metadata) == (READY, b"")
            s.sendall(HEADER.pack(len(step), STEP) + step)
            frame = read_frame(s)
            assert frame is not None and frame[0] == ERROR and b"PERMISSION_DENIED" in frame[1], frame
            assert b"not the previous stage" in frame[1]
            s.close()

        honest.join(90)
        assert out.get("during") == want, out.get("during")
        assert out.get("flood") == want, out.get("flood")
        # and afterwards a fresh request goes over the wire again, with the same tokens
        _collect(coord, greedy, out, "after")
        assert out["after"] == want
        steps = wait_until(lambda: (m := coord.get_json("/api/nodes")) and sum(
            n["metrics"].get("step_wire_steps", 0) for n in m["nodes"]), timeout_s=30, message="wire steps counted")
        assert steps > 0
