"""A hivemind averager whose group is fixed: every round runs hivemind's all-reduce at once.

The replicas of a stage are known exactly from the coordinator's assignment (the job, attempt and
stage, and each replica's hivemind peer id from the rendezvous), so no round needs hivemind's
matchmaking (declare in the DHT, look up leaders, join, wait up to ``min_matchmaking_time``).
Protocol of one round, run by every member in the averager's own process:

1. the caller's gather (``[kind, step, members]``: what is averaged, the step, the members'
   peer ids) names the round; its group id is a hash of the averager's prefix (job, attempt,
   stage) and that gather, so members meet only in a round they all mean, and the peer order is
   the members' order in it (replica order: swarm/pipeline/averaging.py; the same on every member,
   or the group ids differ and the round never forms);
2. the member registers the group and runs ``AllReduceRunner`` (butterfly all-reduce over the
   averager's libp2p, float16 parts) with that order and the same part sizes everywhere;
3. a groupmate that starts the round first sends its parts before this member registered the
   group: its stream waits (bounded by the round timeout) until this member starts the same
   round, instead of being refused (hivemind's averager answers BAD_GROUP_ID then, and the early
   member kept its own values for that part). Streams from peers that are not members are refused;
   at most :data:`MAX_EARLY_GROUPS` such waits are held at once, and a round that already ended
   is refused at once;
4. the round counts only when it is complete: no groupmate was dropped as a sender or a reducer
   (hivemind would otherwise keep the local values of their parts and report success); an
   incomplete or timed-out round fails, and the caller keeps its own values;
5. the member that opened a stream closes it: it reads exactly the averaged parts it expects from
   that groupmate, then closes (:class:`_ClosingRunner`), while the groupmate's handler, having
   sent its last part, waits up to :data:`CLOSE_GRACE_S` for that close instead of closing first.
   With hivemind 1.1.12's p2pd, a handler that closed first lost the stream's last parts in
   flight now and then: in a 300-step 3 x 2 job on a loaded 2-core box, 9 of 900 gradient rounds
   failed with "peer X sent 16 parts, but we expected 18" on one member while its groupmate's
   round succeeded, so the replicas stepped with different gradients.

This relies on hivemind 1.1.12's averager internals (``_step``, ``_register_allreduce_group``,
``_aggregate_with_group``, ``_run_allreduce_inplace_``, ``_running_groups``, the runner's
``_get_peer_stub``, ``tensor_part_reducer.sender_failed_after`` and ``tensor_part_container``); pyproject pins that version and
tests/integration/foundation/test_fixed_group.py exercises each of them.
"""

# no `from __future__ import annotations`: hivemind reads rpc_* annotations as types

import asyncio
import collections
import hashlib
import logging
from typing import AsyncIterator

from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.averaging.group_info import GroupInfo
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import achain, anext, as_aiter
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.timed_storage import get_dht_time

log = logging.getLogger(__name__)

MAX_EARLY_GROUPS = 16  # rounds groupmates may have started before this member, waited for at once
WATCH_S = 0.05  # how often a running round checks whether a groupmate already failed it
RECENT_GROUPS = 64  # ended rounds remembered, so a late groupmate is refused at once, not after a wait
# How long a handler that sent its last averaged part waits for the groupmate to close the stream
# (it does at once when it runs this code; a groupmate running the stock runner reads until the
# handler closes, and so waits this long more per round).
CLOSE_GRACE_S = 2.0


def group_of(prefix: str, data_for_gather: bytes, members: list) -> tuple:
    """The round's group id and peer order: the same on every member that means the same round."""
    group_id = hashlib.sha256(prefix.encode() + b"\0" + data_for_gather).digest()[:20]
    return group_id, tuple(PeerID.from_base58(m) for m in dict.fromkeys(members))


class FixedGroupAverager(DecentralizedAverager):
    """``DecentralizedAverager`` whose ``step(gather=[kind, step, members])`` runs the all-reduce
    among ``members`` (base58 peer ids, this peer included) without matchmaking."""

    def _fixed_state(self):
        if not hasattr(self, "_early"):
            self._early = {}  # group id -> asyncio.Event, set when this member starts that round
            self._ended = collections.deque(maxlen=RECENT_GROUPS)  # group ids of ended rounds
            self._members = set()  # PeerIDs of the group (known once this member ran a round)
        return self._early, self._ended

    async def _step(self, *, step: StepControl, future_for_init: MPFuture):
        early, ended = self._fixed_state()
        group_id = None
        try:
            trigger, cancel = MPFuture(), MPFuture()
            step.attach(trigger, cancel)
            future_for_init.set_result((trigger, cancel))
            _, _, user = self.serializer.loads(step.data_for_gather)
            kind, at, members = self.serializer.loads(user)
            group_id, peer_ids = group_of(self.prefix, step.data_for_gather, members)
            if self.peer_id not in peer_ids or len(peer_ids) < 2:
                raise AllreduceException(f"round {kind}@{at}: this peer is not one of 2+ members {members}")
            self._members |= set(peer_ids)  # (a round of a subgroup, e.g. a fence's survivors, shrinks nothing)
            group = GroupInfo(group_id=group_id, peer_ids=peer_ids,
                              gathered=tuple(step.data_for_gather for _ in peer_ids))
            await step.wait_for_trigger()
            step.stage = AveragingStage.RUNNING_ALLREDUCE
            timeout = max(0.0, min(step.deadline - get_dht_time(), self._allreduce_timeout or float("inf")))
            with self._register_allreduce_group(group):
                early.setdefault(group_id, asyncio.Event()).set()  # groupmates that started first go on
                run = asyncio.create_task(self._aggregate_with_group(
                    group, tensor_infos=self.tensor_infos, weight=step.weight, **self.allreduce_kwargs))
                cancelled = asyncio.create_task(step.wait_for_cancel())
                why = await self._watch(run, cancelled, group_id, timeout)
                cancelled.cancel()
                if why:
                    run.cancel()
                    await asyncio.gather(run, return_exceptions=True)
                    raise AllreduceException(f"round {kind}@{at} {why}")
                gathered = run.result()
                runner = self._running_groups[group_id].result()
                if _incomplete(runner):
                    raise AllreduceException(f"round {kind}@{at} incomplete: {_dropped(runner)} sender(s) "
                                             f"dropped, {runner.tensor_part_container.failed_size} values not averaged")
                step.set_result(gathered)
        except BaseException as exc:
            if not step.done():
                step.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            step.stage = AveragingStage.FINISHED
            if group_id is not None:
                early.pop(group_id, None)
                ended.append(group_id)

    async def _watch(self, run: asyncio.Task, cancelled: asyncio.Task, group_id: bytes, timeout_s: float) -> str:
        """Wait for the all-reduce; why it must stop early ("" when it ended): cancelled by the
        caller, past the deadline, or already incomplete (a groupmate could not be reached: the
        round can no longer count, so the caller is not kept waiting for the timeout; that is when
        hivemind notices: a refused connection at once, a peer whose host vanished only at the timeout)."""
        deadline = get_dht_time() + timeout_s
        while True:
            remaining = deadline - get_dht_time()
            if remaining <= 0:
                return f"timed out (its deadline passed: {timeout_s:.1f} s)"
            done, _ = await asyncio.wait({run, cancelled}, timeout=min(remaining, WATCH_S),
                                         return_when=asyncio.FIRST_COMPLETED)
            if run in done:
                return ""
            if cancelled in done:
                return "cancelled"
            future = self._running_groups.get(group_id)
            if future is not None and future.done() and _incomplete(future.result()):
                return "incomplete: a groupmate could not be reached"

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """A groupmate's parts: handed to this member's runner of the same round, once it runs."""
        early, ended = self._fixed_state()
        request = await anext(stream)
        gid = request.group_id
        if self._members and context.remote_id not in self._members:
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        if gid not in self._running_groups:
            if gid in ended or (gid not in early and len(early) >= MAX_EARLY_GROUPS):
                yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
                return
            started = early.setdefault(gid, asyncio.Event())
            try:
                await asyncio.wait_for(started.wait(), self._allreduce_timeout)
            except asyncio.TimeoutError:
                pass
            finally:
                if not started.is_set():
                    early.pop(gid, None)
        future = self._running_groups.get(gid)
        if future is None:
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        runner = await future
        async for message in runner.rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield message
        # the caller closes the stream once it has read every part (_ClosingRunner); hivemind's
        # p2p handler cancels this wait then. Closing first could lose the parts still in flight.
        await asyncio.sleep(CLOSE_GRACE_S)

    async def _run_allreduce_inplace_(self, tensors, group_info: GroupInfo, group_id=None, **kwargs):
        """hivemind's in-place all-reduce of ``tensors`` with ``group_info``'s members, run by a
        :class:`_ClosingRunner`: the tensors get (mean - own) added as the averaged parts come."""
        group_id = group_info.group_id if group_id is None else group_id
        runner = _ClosingRunner(p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors,
                                group_id=group_id, ordered_peer_ids=group_info.peer_ids, **kwargs)
        if group_id not in self._running_groups:
            raise AllreduceException(f"group {group_id.hex()} is not registered")
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            async for _ in runner:
                raise AllreduceException("an auxiliary member got averaged tensors")
            return
        pending = iter(tensors)
        async for delta in runner:
            next(pending).add_(delta, alpha=self._averaging_alpha)
        self.last_updated = get_dht_time()
        self._state_updated.set()


class _ClosingRunner(AllReduceRunner):
    """An all-reduce runner that ends each stream it opened itself: it stops reading a groupmate's
    averaged parts after the last one it expects (or at the first message that is not a part) and
    closes the stream, so the groupmate's handler never closes first (module doc, step 5)."""

    def _get_peer_stub(self, peer: PeerID):
        expected = self.tensor_part_container.num_parts_by_peer[self.ordered_peer_ids.index(peer)]
        return _ClosingStub(super()._get_peer_stub(peer), expected)


class _ClosingStub:
    """A groupmate's stub whose ``rpc_aggregate_part`` stream ends after ``expected`` averaged parts."""

    def __init__(self, stub, expected: int) -> None:
        self._stub, self._expected = stub, expected

    async def rpc_aggregate_part(self, inputs):
        return _read_then_close(await self._stub.rpc_aggregate_part(inputs), self._expected)


async def _read_then_close(stream, expected: int):
    got = 0
    try:
        while got < expected:
            try:
                message = await anext(stream)
            except StopAsyncIteration:
                return  # the groupmate ended early: the runner counts the parts and fails the round
            yield message
            got += 1
            if message.code != averaging_pb2.AVERAGED_PART:
                return
    finally:
        await stream.aclose()  # closes this end of the p2p stream


def _dropped(runner) -> int:
    """Senders whose parts are missing from some averaged part this member reduced: dropped before
    they sent all their parts (hivemind averages the rest without them). A sender dropped after its
    last part (its stream closed while the handler waited for the end-of-stream) changed nothing."""
    reducer = runner.tensor_part_reducer
    return sum(after < reducer.num_parts for after in reducer.sender_failed_after)


def _incomplete(runner) -> bool:
    """True when a groupmate's values are missing from the round: a sender dropped early, or a
    reducer whose averaged parts never came (hivemind keeps the local values of both and reports
    success)."""
    return bool(_dropped(runner) or runner.tensor_part_container.failed_size)
