"""How a replica reads the outcome of a gradient round (swarm/pipeline/averaging.py, fixed_group.py):
a round that ends just as the 50 ms wait gives up is a success, not a failure; a sender dropped
only after its last part changed nothing; a stream reader stops at the last expected part and
closes its end."""

from __future__ import annotations

import asyncio
from concurrent.futures import TimeoutError as FutureTimeout
from types import SimpleNamespace

import pytest

pytest.importorskip("hivemind")

from hivemind.proto import averaging_pb2  # noqa: E402

from swarm.pipeline import fixed_group  # noqa: E402
from swarm.pipeline.averaging import ReplicaAverager  # noqa: E402

pytestmark = pytest.mark.timeout(30)


class _EndsWhileWaiting:
    """A round's control whose first timed wait gives up at the very moment the round ends."""

    def __init__(self, outcome) -> None:
        self.outcome, self.waits, self.ended = outcome, 0, False

    def result(self, timeout=None):
        self.waits += 1
        if not self.ended:
            self.ended = True
            raise FutureTimeout()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def done(self) -> bool:
        return self.ended

    def cancel(self) -> None:
        raise AssertionError("a round that ended is not cancelled")


def test_a_round_that_ends_as_the_wait_gives_up_counts() -> None:
    control = _EndsWhileWaiting({"peer": ["grad", 7, []]})
    assert ReplicaAverager._wait(control, lambda: False) == {"peer": ["grad", 7, []]}
    assert control.waits == 2


def test_a_round_that_timed_out_itself_still_fails() -> None:
    control = _EndsWhileWaiting(TimeoutError("the round's deadline passed"))
    with pytest.raises(TimeoutError, match="deadline"):
        ReplicaAverager._wait(control, lambda: False)


def _runner(failed_after, num_parts=4, failed_size=0):
    return SimpleNamespace(tensor_part_reducer=SimpleNamespace(sender_failed_after=failed_after, num_parts=num_parts),
                           tensor_part_container=SimpleNamespace(failed_size=failed_size))


def test_only_senders_dropped_before_their_last_part_make_a_round_incomplete() -> None:
    inf = float("inf")
    assert not fixed_group._incomplete(_runner([inf, inf]))
    assert not fixed_group._incomplete(_runner([inf, 4]))  # dropped after all 4 parts: nothing missing
    assert fixed_group._dropped(_runner([inf, 2])) == 1
    assert fixed_group._incomplete(_runner([0, inf]))  # never sent (a missing sender)
    assert fixed_group._incomplete(_runner([inf, inf], failed_size=64))  # a reducer's parts never came


class _Stream:
    def __init__(self, codes) -> None:
        self.messages = [averaging_pb2.AveragingData(code=c) for c in codes]
        self.read = 0
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.read == len(self.messages):
            raise StopAsyncIteration
        self.read += 1
        return self.messages[self.read - 1]

    async def aclose(self) -> None:
        self.closed = True


async def _collect(stream, expected):
    return [m async for m in fixed_group._read_then_close(stream, expected)]


def test_the_reader_closes_after_the_last_expected_part_without_reading_on() -> None:
    part = averaging_pb2.AVERAGED_PART
    stream = _Stream([part, part, part, part])
    got = asyncio.run(_collect(stream, 3))
    assert len(got) == 3 and stream.read == 3 and stream.closed


def test_the_reader_stops_at_an_error_and_at_an_early_end() -> None:
    part = averaging_pb2.AVERAGED_PART
    stream = _Stream([part, averaging_pb2.INTERNAL_ERROR, part])
    got = asyncio.run(_collect(stream, 3))
    assert [m.code for m in got] == [part, averaging_pb2.INTERNAL_ERROR] and stream.closed
    short = _Stream([part])
    assert len(asyncio.run(_collect(short, 3))) == 1 and short.closed  # the runner counts 1 of 3 and fails
