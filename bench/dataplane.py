"""Cost of moving one boundary tensor between two pipeline stages, in one process over loopback.

    python -m bench.dataplane                      # CPU; shapes of the quick run and of the H200 job
    python -m bench.dataplane --device cuda
    python -m bench.dataplane --tls-cost --shapes 4x256x1024   # TLS vs plaintext, persistent stream

For each shape (micro-batch, seq, hidden; float32, codec ``none``) and each path, N tensors go
from a PeerSender to a real gRPC server (PipelinePeerServicer + Endpoint that decodes the codec
message) and are taken from the endpoint:

- ``PushTensor (before)``: the pre-issue-16 path: the caller serialises (``to_bytes``, CRC) and
  streams 1 MiB protobuf chunks, one RPC per tensor;
- ``persistent stream``: ``send_message`` (the sender thread serialises, one frame per tensor on
  a long-lived acknowledged stream).

Columns: ms per tensor (wall, end to end, tensors pipelined), and the calling (compute) thread's
CPU ms per tensor, which is what the stage's compute loses to the data plane.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench._record import markdown_table, record
from swarm import certs
from swarm.transport.tls import PlaintextSecurity, TlsSecurity
from node.training.exchange import Endpoint, Endpoints, PipelinePeerServicer
from node.training.sender import PeerSender
from swarm.compression import CodecMessage, decode_tensor, encode_tensor
from swarm.proto.v1 import training_pb2_grpc
from swarm.transport import tensors as wt
from swarm.transport.channels import DATA_MAX_MESSAGE_BYTES, bind, make_server


def _message(x: torch.Tensor) -> CodecMessage:
    B = x.shape[0]
    return CodecMessage(kind="none", direction="forward", key_fingerprint=0, sample_ids=tuple(range(B)),
                        delta_mask=(False,) * B, fresh=encode_tensor(x, bits=None))


SENDER, RECEIVER = "a" * 32, "b" * 32


def _node_security(ca, node_id: str) -> TlsSecurity:
    """A node's mTLS credentials from a throwaway swarm CA, as the coordinator would issue them."""
    key = certs.new_key()
    cert = ca.issue_node(node_id, certs.public_key_der(key), now_s=time.time(), lifetime_s=3600.0)
    return TlsSecurity(ca_pem=ca.ca_pem, key_pem=certs.key_pem(key), cert_pem=cert)


def run(shape: tuple[int, ...], n: int, path: str, device: str) -> dict:
    """One path's cost over TLS (mTLS between two node identities), as nodes run it."""
    from coordinator.ca import CoordinatorCA

    with tempfile.TemporaryDirectory(prefix="bench-dataplane-") as tmp:
        ca = CoordinatorCA(Path(tmp), now_s=time.time())
        return _run(shape, n, path, device, _node_security(ca, SENDER), _node_security(ca, RECEIVER))


def run_plaintext(shape: tuple[int, ...], n: int, path: str, device: str) -> dict:
    """The same path over the benchmark-only plaintext transport (what TLS costs, --tls-cost)."""
    return _run(shape, n, path, device, PlaintextSecurity(SENDER), PlaintextSecurity(RECEIVER))


def _run(shape: tuple[int, ...], n: int, path: str, device: str, sender_sec, receiver_sec) -> dict:
    endpoints = Endpoints()
    srv = make_server(max_message_bytes=DATA_MAX_MESSAGE_BYTES, max_workers=8)
    peer = PipelinePeerServicer(endpoints, identify=receiver_sec.peer_identity)
    training_pb2_grpc.add_PipelinePeerServicer_to_server(peer, srv)
    srv.add_generic_rpc_handlers((peer.stream_receiver().handler(),))
    port = bind(srv, "127.0.0.1", 0, security=receiver_sec)
    srv.start()

    def validate(h, payload):
        msg = CodecMessage.from_bytes(payload, device=device)
        return decode_tensor(msg.fresh, dtype=torch.float32).to(device)

    ep = Endpoint("job", validate)
    endpoints.add(ep)
    sender = PeerSender(f"127.0.0.1:{port}", security=sender_sec, node_id=RECEIVER, what="peer", timeout_s=60)
    x = torch.randn(*shape, device=device)
    fields = dict(job_id="job", step=0, shape=shape, dtype="float32", kind="activation", sender_id=SENDER)
    stop = threading.Event()
    pushes: queue.Queue = queue.Queue()

    def push_loop() -> None:  # the old PeerSender thread: one PushTensor call per tensor
        while (wire := pushes.get()) is not None:
            sender._deliver(wire)

    pusher = threading.Thread(target=push_loop, daemon=True)
    pusher.start()

    def one(mb: int) -> None:
        msg = _message(x)
        if path == "push":  # the old worker: serialise and checksum on the compute thread
            payload = msg.to_bytes()
            header = wt.make_header(payload, micro_batch=mb, **fields)
            pushes.put(wt.WireTensor(header=header, payload=payload))
        else:
            m, ready = msg.to_host()
            sender.send_message(m, ready, micro_batch=mb, **fields)

    for mb in range(3):  # warm-up (connection, stream)
        one(mb)
        ep.get("activation", 0, mb, timeout_s=60, stop=stop, what="peer")
    t0, p0 = time.perf_counter(), time.process_time()
    cpu = 0.0
    for mb in range(3, 3 + n):
        c = time.thread_time()
        one(mb)
        cpu += time.thread_time() - c
    for mb in range(3, 3 + n):
        ep.get("activation", 0, mb, timeout_s=60, stop=stop, what="peer")
    wall, process_s = time.perf_counter() - t0, time.process_time() - p0
    pushes.put(None)
    pusher.join(timeout=60)
    sender.flush()
    sender.close()
    srv.stop(0)
    nbytes = n * x.numel() * 4
    return {"ms_per_tensor": 1e3 * wall / n, "caller_cpu_ms_per_tensor": 1e3 * cpu / n,
            "mb_per_s": nbytes / wall / 1e6, "cpu_s_per_gb": process_s / (nbytes / 1e9)}


def tls_cost(args, shapes: list[tuple[int, ...]]) -> int:
    """Persistent stream, TLS vs plaintext, interleaved rounds; throughput keeps the best round,
    CPU (both ends: they share the process) the least."""
    runs: dict = {}
    for _ in range(args.repeats):
        for shape in shapes:
            for mode, fn in (("TLS", run), ("plaintext", run_plaintext)):
                runs.setdefault((shape, mode), []).append(fn(shape, args.n, "stream", args.device))
    rows = []
    for shape in shapes:
        t, p = runs[(shape, "TLS")], runs[(shape, "plaintext")]
        bt, bp = max(r["mb_per_s"] for r in t), max(r["mb_per_s"] for r in p)
        ct, cp = min(r["cpu_s_per_gb"] for r in t), min(r["cpu_s_per_gb"] for r in p)
        spread = "TLS " + "/".join(f"{r['mb_per_s']:.0f}" for r in t) + "; plain " + "/".join(f"{r['mb_per_s']:.0f}" for r in p)
        rows.append(["x".join(map(str, shape)), f"{4 * torch.Size(shape).numel() / 2**20:.2f}", bt, bp,
                     f"{bt / bp:.3f}", ct, cp, f"{ct - cp:.2f}", spread])
    headers = ["shape (b x S x H)", "MiB", "MB/s TLS", "MB/s plaintext", "TLS / plaintext", "CPU s/GB TLS",
               "CPU s/GB plaintext", "TLS CPU s/GB extra", "MB/s per round"]
    table = markdown_table(headers, rows)
    print(json.dumps([dict(zip(headers, r)) for r in rows]) if args.json else table)
    notes = (f"One process, loopback, persistent PipelineStream (PeerSender -> PipelinePeerServicer), {args.device}, "
             f"float32 codec `none`, {args.n} tensors back to back per run, {args.repeats} interleaved rounds: MB/s the "
             "best round, CPU the least; CPU s/GB is the whole process's CPU time (sender and receiver, every thread) "
             "per GB moved. TLS: mTLS between two node certificates (ECDSA P-256, TLS 1.3); plaintext: the "
             "benchmark-only PlaintextSecurity.")
    if not args.no_record:
        record(f"Data plane: TLS against plaintext, one persistent stream ({args.device}, loopback)", table, notes)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default="4x128x128,4x256x1024", help="micro-batch x seq x hidden, comma list")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tls-cost", action="store_true",
                    help="the persistent stream over TLS against the benchmark-only plaintext transport")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    if args.tls_cost:
        return tls_cost(args, shapes)
    best: dict = {}
    for _ in range(args.repeats):  # interleaved; each keeps its best (least disturbed) run
        for shape in shapes:
            for path in ("push", "stream"):
                r = run(shape, args.n, path, args.device)
                key = (shape, path)
                if key not in best or r["ms_per_tensor"] < best[key]["ms_per_tensor"]:
                    best[key] = r
    rows = []
    for (shape, path), r in best.items():
        rows.append(["x".join(map(str, shape)), f"{4 * torch.Size(shape).numel() / 2**20:.2f}",
                     "PushTensor (before)" if path == "push" else "persistent stream",
                     r["ms_per_tensor"], r["caller_cpu_ms_per_tensor"], r["mb_per_s"]])
    headers = ["shape (b x S x H)", "MiB", "path", "ms per tensor (wall)", "compute-thread CPU ms per tensor", "MB/s"]
    table = markdown_table(headers, rows)
    if args.json:
        print(json.dumps([dict(zip(headers, r)) for r in rows]))
    else:
        print(table)
    notes = (f"One process, loopback gRPC, {args.device}, float32 codec `none`, {args.n} tensors back to back per run, "
             f"best of {args.repeats} interleaved runs; sender and receiver share the process (and its GIL).")
    if not args.no_record:
        record(f"Data plane: one boundary tensor, before/after ({args.device})", table, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
