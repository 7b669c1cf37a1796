"""A worker's side of a holder-loss fence (coordinator/jobs/churn.py ``holder_loss``;
node/training/tensor_io.py): a failed sender to a holder of a shared neighbour stage is held off for
up to the peer timeout (the coordinator may yet drop that holder), sends to a dropped holder are
skipped, and a wait for a dropped micro-batch ends. No network: fake senders and an endpoint."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from node.training.assignment import DroppedShare, Peer
from node.training.exchange import Endpoint
from node.training.tensor_io import MicroBatchDropped, TensorIO
from swarm.errors import PeerError

pytestmark = pytest.mark.timeout(30)


class FakeSender:
    def __init__(self, node_id: str, *, failed: bool = False) -> None:
        self.node_id = node_id
        self.error = PeerError(f"{node_id} is gone") if failed else None
        self.sent = 0

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def send_message(self, msg, ready=None, **fields) -> None:
        self.sent += 1


class FakeMembership:
    def __init__(self) -> None:
        self.gone: frozenset[str] = frozenset()
        self.dropped: tuple = ()

    def while_waiting(self, step: int) -> None:
        pass

    def doomed(self, m: int) -> bool:
        return any(d.holds(m) for d in self.dropped)


class Host(TensorIO):
    def __init__(self, senders, *, timeout_s: float = 30.0) -> None:
        peer = lambda n: Peer(node_id=n, address="x")  # noqa: E731
        # stage 0 of one pipeline whose stage 1 is shared by "main" and "helper"; "solo" is unshared
        self.a = SimpleNamespace(stage=0, prev_holders=(), next_holders=(peer("main"), peer("helper")),
                                 prev_for=lambda m: None, next_for=lambda m: peer("main" if m % 2 == 0 else "helper"))
        self.senders = senders
        self.membership = FakeMembership()
        self.timeout_s = timeout_s
        self._sender_failed_at = {}
        self.stop_event = threading.Event()
        self.endpoint = Endpoint("j", validate=lambda header, payload: None)


def test_a_failed_sender_to_a_shared_stage_s_holder_is_held_off_an_unshared_one_fails_at_once():
    helper, solo = FakeSender("helper", failed=True), FakeSender("solo", failed=True)
    host = Host([FakeSender("main"), helper])
    host._check_senders()  # held off: the coordinator may drop the helper (a holder-loss fence)
    assert host._send(helper, "activation", 3, 1, [0, 1], None, 0) == 0  # and nothing is queued to it
    host.timeout_s = 0.0  # ... for up to the peer timeout, then its failure is the worker's
    with pytest.raises(PeerError):
        host._check_senders()
    with pytest.raises(PeerError):
        Host([solo])._check_senders()


def test_once_the_holder_is_dropped_its_sender_is_left_alone_and_waits_for_its_micro_batches_end():
    helper = FakeSender("helper", failed=True)
    host = Host([FakeSender("main"), helper], timeout_s=0.0)
    host.membership.gone = frozenset({"helper"})
    host.membership.dropped = (DroppedShare(node_id="helper", stage=1, share_index=1, share_count=2),)
    host._check_senders()  # its failure is nobody's concern now
    assert host._live_senders() == [host.senders[0]]
    assert host._send(helper, "activation", 3, 1, [0, 1], None, 0) == 0
    host.timeout_s = 30.0
    with pytest.raises(MicroBatchDropped):  # micro-batch 1's gradient would come back through the helper
        host._receive("gradient", 3, 1)
