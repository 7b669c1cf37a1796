"""Which stages a failed replica's probe reports dead (coordinator/inference/stage_calls.py): a
stage that is slow to answer once is asked again with a longer deadline before it is taken for
dead (a loaded survivor was re-placed instead of relinked); a refused or silent one is dead; a
stage that refuses the capability answered, so it lives. No network: fake stubs."""

from __future__ import annotations

import grpc
import pytest

from coordinator.inference.sessions import StageRef
from coordinator.inference.stage_calls import StageCalls

pytestmark = pytest.mark.timeout(30)


class _Err(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code


class _Stub:
    """Answers CloseSession with the given outcomes in turn (None: an answer), noting each deadline."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.deadlines = []

    def CloseSession(self, request, timeout, metadata):  # noqa: N802 -- the gRPC method's name
        self.deadlines.append(timeout)
        out = self.outcomes.pop(0)
        if out is not None:
            raise _Err(out)


def _replica(stubs):
    stages = [StageRef(node_id=f"n{i}", address=f"127.0.0.1:{1000 + i}", first_layer=i, last_layer_excl=i + 1)
              for i in range(len(stubs))]
    calls = StageCalls(model="m", index=0, stages=[], security=None, capability="c")  # no channels to open
    calls.stages, calls.stubs = stages, stubs
    return calls


def test_a_slow_survivor_is_asked_again_and_lives():
    D = grpc.StatusCode.DEADLINE_EXCEEDED
    slow, gone = _Stub(D, None), _Stub(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
    assert _replica([slow, gone]).probe(timeout_s=2.0, retry_timeout_s=6.0) == ["n1"]
    assert slow.deadlines == [2.0, 6.0] and gone.deadlines == [2.0, 6.0]


def test_answers_and_capability_refusals_are_alive_and_asked_once():
    ok, refused = _Stub(None), _Stub(grpc.StatusCode.PERMISSION_DENIED)
    silent = _Stub(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert _replica([ok, refused, silent]).probe() == ["n2"]
    assert len(ok.deadlines) == 1 and len(refused.deadlines) == 1 and len(silent.deadlines) == 2
