"""Nothing fills it: heartbeats are not SQLite writes, and a full disk is RESOURCE_EXHAUSTED.

In-process coordinator; the "full disk" is the error SQLite raises then ("database or disk is
full"), from every write of the registry's and the admission's connections.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import grpc
import pytest

from swarm.identity import Identity
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.proto.v1 import coordinator_pb2_grpc as pb_grpc
from swarm.transport.auth import api_token_metadata, call_metadata
from tests.helpers.foundation import inprocess_coordinator, make_register
from tests.helpers.tls import app_channel


class _FullDisk:
    """A connection on a full disk: every write fails as SQLite reports it (SQLITE_FULL)."""

    def __init__(self, conn) -> None:
        self._conn = conn

    def _check(self, sql: str) -> None:
        if sql.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE", "REPLACE"):
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql, *args):
        self._check(sql)
        return self._conn.execute(sql, *args)

    def executemany(self, sql, *args):
        self._check(sql)
        return self._conn.executemany(sql, *args)

    def __enter__(self):
        return self._conn.__enter__()

    def __exit__(self, *exc):
        return self._conn.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def test_heartbeats_are_kept_in_memory_and_flushed(tmp_path):
    with inprocess_coordinator(tmp_path / "c", flush_interval_s=3600) as app:
        with app_channel(app) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            ident = Identity.from_seed(b"beats")
            reply = stub.Register(make_register(app, ident), timeout=10)
            meta = call_metadata(ident.node_id, reply.session)
            before = app.registry._conn.total_changes  # the registry's own connection
            for i in range(50):
                stub.Heartbeat(pb.HeartbeatRequest(status=f"beat {i}"), metadata=meta, timeout=10)
            assert app.registry._conn.total_changes == before  # 50 heartbeats, no write
            assert app.registry.get(ident.node_id).status == "beat 49"
            assert app.registry.flush() == 1
            row = app.registry._conn.execute("SELECT status FROM nodes WHERE id = ?", (ident.node_id,)).fetchone()
            assert row == ("beat 49",)


def test_full_disk_refuses_registrations_and_heartbeats_keep_nodes_online(tmp_path):
    with inprocess_coordinator(tmp_path / "c", node_timeout_s=1.0, flush_interval_s=0.1) as app:
        with app_channel(app) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            ident = Identity.from_seed(b"survivor")
            reply = stub.Register(make_register(app, ident), timeout=10)
            meta = call_metadata(ident.node_id, reply.session)
            app.registry._conn = _FullDisk(app.registry._conn)
            app.admission._conn = _FullDisk(app.admission._conn)

            with pytest.raises(grpc.RpcError) as e:
                stub.Register(make_register(app, Identity.from_seed(b"newcomer")), timeout=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "disk is full" in e.value.details()

            # Heartbeats for twice the node timeout (the flusher fails meanwhile): never lost.
            end = time.monotonic() + 2.0
            tick = threading.Event()
            while time.monotonic() < end:
                stub.Heartbeat(pb.HeartbeatRequest(status="busy"), metadata=meta, timeout=10)
                assert app.registry.get(ident.node_id).state == "online"
                tick.wait(0.2)  # the heartbeat cadence of a node
            nodes = stub.ListNodes(pb.ListNodesRequest(), timeout=10, metadata=api_token_metadata(app.read_token)).nodes
            assert [(n.node_id, n.state) for n in nodes] == [(ident.node_id, "online")]
