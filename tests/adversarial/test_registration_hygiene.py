"""Attacks on registration: replay across a restart, identity floods, squatting addresses.

In-process coordinator on 127.0.0.1:0 with real gRPC stubs; restarts reuse the state dir.
"""

from __future__ import annotations

from contextlib import contextmanager

import grpc
import pytest

from coordinator.admission import AdmissionPolicy
from swarm.identity import Identity
from swarm.proto.v1 import coordinator_pb2_grpc as pb_grpc
from tests.helpers.foundation import inprocess_coordinator, make_register
from tests.helpers.procs import wait_until
from tests.helpers.tls import app_channel


@contextmanager
def coordinator(state_dir, **overrides):
    with inprocess_coordinator(state_dir, **overrides) as app:
        with app_channel(app) as channel:
            yield app, pb_grpc.CoordinatorStub(channel)


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_registration_captured_before_a_restart_is_refused_after_it(tmp_path):
    ident = Identity.from_seed(b"replayed")
    with coordinator(tmp_path / "c") as (app, stub):
        captured = make_register(app, ident)
        stub.Register(captured, timeout=10)
    with coordinator(tmp_path / "c") as (app, stub):
        code, details = _code(lambda: stub.Register(captured, timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "replay" in details
        stub.Register(make_register(app, ident), timeout=10)  # a freshly signed one is fine


def test_one_token_cannot_register_more_identities_than_its_limit(tmp_path):
    policy = AdmissionPolicy(max_identities_per_token=3, max_new_identities_per_min=100)
    with coordinator(tmp_path / "c", admission=policy) as (app, stub):
        idents = [Identity.from_seed(b"flood%d" % i) for i in range(4)]
        for ident in idents[:3]:
            stub.Register(make_register(app, ident), timeout=10)
        code, details = _code(lambda: stub.Register(make_register(app, idents[3]), timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-identities-per-token" in details
        stub.Register(make_register(app, idents[0]), timeout=10)  # a known identity registers again freely
    with coordinator(tmp_path / "c", admission=policy) as (app, stub):  # the count survives a restart
        code, _ = _code(lambda: stub.Register(make_register(app, idents[3]), timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_new_identities_per_minute_are_limited(tmp_path):
    policy = AdmissionPolicy(max_identities_per_token=100, max_new_identities_per_min=2)
    with coordinator(tmp_path / "c", admission=policy) as (app, stub):
        for i in range(2):
            stub.Register(make_register(app, Identity.from_seed(b"rate%d" % i)), timeout=10)
        code, details = _code(lambda: stub.Register(make_register(app, Identity.from_seed(b"rate9")), timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-new-identities-per-min" in details


def test_lost_identities_are_purged_after_the_ttl_and_free_the_limit(tmp_path):
    policy = AdmissionPolicy(max_identities_per_token=2, max_new_identities_per_min=100, lost_node_ttl_s=0.5)
    with coordinator(tmp_path / "c", admission=policy, node_timeout_s=0.5, heartbeat_interval_s=0.1) as (app, stub):
        for i in range(2):
            stub.Register(make_register(app, Identity.from_seed(b"gone%d" % i)), timeout=10)
        # silent nodes: lost after 0.5 s, forgotten 0.5 s later
        wait_until(lambda: not app.registry.snapshot(), timeout_s=10, message="lost nodes purged")
        assert app.admission.num_identities(app.join_token) == 0
        stub.Register(make_register(app, Identity.from_seed(b"newcomer")), timeout=10)
    with coordinator(tmp_path / "c", admission=policy) as (app, _):  # purged for good
        assert [n.name for n in app.registry.snapshot()] == ["node-a"]


@pytest.mark.parametrize("address", ["169.254.169.254:80", "[fe80::1]:7000", "0.0.0.0:7000"])
def test_link_local_and_unspecified_addresses_are_refused(tmp_path, address):
    with coordinator(tmp_path / "c") as (app, stub):
        code, details = _code(lambda: stub.Register(make_register(app, Identity.from_seed(b"x"), address=address),
                                                    timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "--advertise-host" in details


def test_address_of_another_online_node_or_the_coordinator_is_refused(tmp_path):
    with coordinator(tmp_path / "c") as (app, stub):
        a, b = Identity.from_seed(b"a"), Identity.from_seed(b"b")
        stub.Register(make_register(app, a, address="127.0.0.1:23456"), timeout=10)
        # while a's dial-back is pending it holds no address (two NAT'd nodes may advertise the
        # same private one); once the dial-back proved it, the address is a's alone
        stub.Register(make_register(app, b, address="127.0.0.1:23456"), timeout=10)
        app.registry.set_reachability(a.node_id, reachability="direct", published_address="127.0.0.1:23456",
                                      observed_address="127.0.0.1:23456")
        code, details = _code(lambda: stub.Register(make_register(app, b, address="127.0.0.1:23456"), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "another online node" in details
        stub.Register(make_register(app, a, address="127.0.0.1:23456"), timeout=10)  # its own address: fine
        for port in (app.grpc_port, app.http_port):
            code, details = _code(lambda port=port: stub.Register(
                make_register(app, b, address=f"127.0.0.1:{port}"), timeout=10))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "coordinator's own port" in details
