"""Gradient averaging among the replicas of one stage through hivemind.

Protocol a replica follows (one :class:`ReplicaAverager` per job and stage on each member):

1. start a hivemind DHT on this host (``host_maddrs``) joined to ``initial_peers`` (the
   multiaddrs of replicas that started earlier, learnt through the coordinator's rendezvous);
   learn the group once, :meth:`ReplicaAverager.set_members`: the multiaddrs of all
   ``num_replicas`` replicas in replica order (the rendezvous' answer), whose ``/p2p/`` parts are
   their peer ids; that order is the all-reduce's peer order, so replica r reduces the same part
   of every round in every run of the job: with a peer order of sorted (random) peer ids, which
   replica got the exact mean of which part and which its fp16-rounded copy changed from run to
   run (with rounds that failed at random steps, the reason two fault-free runs of one 2-replica
   job ended 0.04 nats apart after 3172 steps; 0.002 with both fixed: docs/benchmarks.md);
2. every step, copy the stage's gradients into the averager's buffers and call the averager's
   ``step`` with a bounded timeout: the group is fixed (swarm/pipeline/fixed_group.py), so the
   all-reduce starts at once, no matchmaking; the payload travels as float16. (Matchmaking cost
   ~1 s a round and stalled ~10 s in 12 of 482 rounds: docs/benchmarks.md, "Gradient averaging");
3. on success the buffers hold the group mean and are copied back into the gradients; on a
   timeout or a missing replica the step keeps the local gradients (the others are not blocked)
   and the failure is counted; every replica's copy of the mean differs from the others' by
   the fp16 rounding of the deltas hivemind sends (~1e-4 relative), so replicas are close, never
   bit-identical; a round the replicas agree to run on *parameters* instead
   (:meth:`ReplicaAverager.average_parameters`, same buffers) brings replicas that drifted apart
   after a failed round back together; ``abort`` (a callable polled while waiting) cancels a round that
   can no longer complete, e.g. when the coordinator fences the attempt after losing a replica;
4. a parameter round may also run in the background, behind the next step's compute
   (:meth:`ReplicaAverager.begin_parameter_round` after the optimizer step of step t, then
   :meth:`collect_parameter_round` before the gradient round of step t+1, whose buffers it
   shares, and :meth:`apply_parameter_round` when the caller is done with step t+1's weights):
   each replica adds (mean of the replicas' step-t parameters - its own step-t parameters) to
   its parameters, i.e. the replicas meet one step later than with a blocking round, without
   waiting for it. Rounds never overlap: a round started while one is pending collects it first.

hivemind is imported lazily: single-replica jobs never load it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Sequence

import torch

from swarm.errors import PeerError

log = logging.getLogger(__name__)

# Replicas average their *parameters* every this many steps (after the optimizer step, in the
# background behind the next step's compute), so replicas that a failed gradient round set apart
# (each stepped with its own gradients) meet again: every job with replicas, checked or not (a
# job's result is one replica's copy; an unchecked job used to keep replicas apart for good). Its
# cost is one extra all-reduce of the stage's parameters per period: 0.3-0.4% of a step
# (bench/verification.py --quick; every 5 steps cost 1.3%). Replicas whose rounds succeed drift
# apart by fp16 rounding, ~1e-4 per round, far inside the spot checks' SYNC_TOLERANCE (3e-3) over
# 20 steps (coordinator/jobs/spotchecks.py).
RESYNC_EVERY_STEPS = 20


class ReplicaAverager:
    """Averages gradients of ``params`` with the other replicas of a stage under ``prefix``."""

    def __init__(
        self,
        *,
        params: Sequence[torch.nn.Parameter],
        prefix: str,
        num_replicas: int,
        initial_peers: Sequence[str] = (),
        host: str = "127.0.0.1",
        timeout_s: float = 30.0,
        setup_timeout_s: float | None = None,
    ) -> None:
        from hivemind.compression import Float16Compression
        from hivemind.dht import DHT

        from swarm.pipeline.fixed_group import FixedGroupAverager

        if num_replicas < 2:
            raise ValueError("averaging needs at least two replicas")
        self.params = [p for p in params if p.requires_grad]
        self.num_replicas = num_replicas
        self.timeout_s = timeout_s
        self.members: list[str] = []  # peer ids of the group, this replica's included (set_members)
        self.num_ok = 0
        self.num_failed = 0
        self._pending = None  # the round in flight: (kind, control, gather, own parameters or None)
        self._delta: list[torch.Tensor] | None = None  # its outcome: mean - own, waiting to be applied
        # a bounded wait for the DHT's process (hivemind's own waits forever): a child that never
        # comes up becomes an error the caller reports, not a stage that hangs
        self.dht = DHT(start=True, await_ready=False, host_maddrs=[f"/ip4/{host}/tcp/0"],
                       initial_peers=list(initial_peers))
        buffers = [torch.zeros_like(p, device="cpu", dtype=torch.float32) for p in self.params]
        try:
            self.dht.wait_until_ready(setup_timeout_s or timeout_s)
            # no state sharing (joiners copy weights from the coordinator or a live replica, not
            # hivemind): its periodic DHT declarations would only load the machine
            self.averager = FixedGroupAverager(
                buffers, self.dht, start=False, prefix=prefix, target_group_size=num_replicas, min_group_size=2,
                allreduce_timeout=timeout_s, compression=Float16Compression(), shutdown_timeout=2,
                allow_state_sharing=False,
            )
            # start() ourselves: run_in_background() installs a SIGINT handler, which only the main
            # thread may do, and stage workers run in their own threads.
            self.averager.start()
            self.averager.wait_until_ready(setup_timeout_s or timeout_s)
        except BaseException:
            _stop(self.dht, self.dht.shutdown, 3.0)
            raise

    def maddrs(self) -> list[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def peer_id(self) -> str:
        return str(self.dht.peer_id)

    def set_members(self, maddrs: Sequence[str]) -> None:
        """The group: multiaddrs of all ``num_replicas`` replicas in replica order, this one's
        included (the peer id is each address' ``/p2p/`` part; several addresses of one peer count
        once, at the first). Every member must pass the same order (the rendezvous' answer): it is
        the rounds' peer order. Raises ValueError when they do not name exactly ``num_replicas``
        peers including this one."""
        ids: dict[str, None] = {}  # insertion-ordered
        for m in maddrs:
            _, sep, pid = str(m).rpartition("/p2p/")
            if not sep or not pid or "/" in pid:
                raise ValueError(f"multiaddr {m!r} has no /p2p/<peer id> part; pass the replicas' maddrs()")
            ids.setdefault(pid)
        if len(ids) != self.num_replicas or self.peer_id() not in ids:
            raise ValueError(f"the averaging group must be the {self.num_replicas} replicas of the stage, this one "
                             f"({self.peer_id()}) included; got {list(ids)}")
        self.members = list(ids)

    def wait_for_peers(self, num_peers: int, timeout_s: float) -> None:
        """Block until this DHT knows ``num_peers`` other peers; raises PeerError on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            known = len(self.dht.run_coroutine(_routing_peers))
            if known >= num_peers:
                return
            if time.monotonic() > deadline:
                raise PeerError(f"only {known} of {num_peers} stage replicas reachable through hivemind after {timeout_s:.0f} s")
            time.sleep(0.1)

    def average_gradients(self, abort=None, step: int = -1) -> bool:
        """Replace every gradient by the replicas' mean; False (gradients unchanged) on failure
        or when ``abort()`` (polled every 50 ms) turns true before the round ends."""
        self.begin_gradient_round(step)
        return self.finish_gradient_round(abort)

    def begin_gradient_round(self, step: int) -> None:
        """Start the gradient round of ``step`` (the gradients are copied now); the caller may
        work meanwhile, without touching the gradients, until :meth:`finish_gradient_round`."""
        self.collect_parameter_round()  # rounds never overlap: they share the buffers
        with self.averager.get_tensors() as bufs:
            for b, p in zip(bufs, self.params):
                if p.grad is None:
                    b.zero_()
                else:
                    b.copy_(p.grad.detach().to("cpu", torch.float32))
        self._start("grad", step)

    def finish_gradient_round(self, abort=None) -> bool:
        """Wait for the gradient round and copy the mean into the gradients; False (gradients
        unchanged) when none was started, it failed, or ``abort()`` turned true first."""
        if self._pending is None or self._pending[0] != "grad":
            return False
        if not self._finish(abort):
            return False
        with self.averager.get_tensors() as bufs:
            for b, p in zip(bufs, self.params):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.copy_(b.to(p.grad.device, p.grad.dtype))
        return True

    def average_parameters(self, abort=None, step: int = -1, members: Sequence[int] | None = None) -> bool:
        """Replace every parameter by the replicas' mean (the replicas must all call this at the
        same step: the round shares the gradients' buffers and group key); False (parameters
        unchanged) on failure or abort. ``members``: only these of the group (positions in
        :attr:`members`, this replica's included; every one of them must pass the same), e.g. the
        survivors of a fence that lost a replica (node/training/worker.py ``_fence_stop``)."""
        self.collect_parameter_round()
        with self.averager.get_tensors() as bufs:
            for b, p in zip(bufs, self.params):
                b.copy_(p.detach().to("cpu", torch.float32))
        self._start("params", step, group=self.subgroup(members) if members is not None else None)
        if not self._finish(abort):
            return False
        with torch.no_grad(), self.averager.get_tensors() as bufs:
            for b, p in zip(bufs, self.params):
                p.copy_(b.to(p.device, p.dtype))
        return True

    def begin_parameter_round(self, step: int) -> None:
        """Start averaging the parameters (as they are now: after step ``step``'s optimizer
        step) in the background; every replica must call this at the same step. Keeps one copy
        of the parameters on the host until :meth:`collect_parameter_round`."""
        self.collect_parameter_round()
        with self.averager.get_tensors() as bufs:
            for b, p in zip(bufs, self.params):
                b.copy_(p.detach().to("cpu", torch.float32))
            own = [b.clone() for b in bufs]
        self._start("params", step, own)

    def collect_parameter_round(self, abort=None) -> bool:
        """Wait for a background parameter round (if any) and keep its outcome for
        :meth:`apply_parameter_round`; the parameters are not touched. False when none was
        pending, or it failed or was aborted."""
        if self._pending is None or self._pending[0] != "params" or self._pending[3] is None:
            return False
        own = self._pending[3]
        if not self._finish(abort):
            return False
        with self.averager.get_tensors() as bufs:
            for o, b in zip(own, bufs):
                torch.sub(b, o, out=o)  # mean - own, in place of own
        self._delta = own
        return True

    def apply_parameter_round(self) -> bool:
        """Add the collected round's (mean - own) to the parameters; False when there is none."""
        delta, self._delta = self._delta, None
        if delta is None:
            return False
        with torch.no_grad():
            for d, p in zip(delta, self.params):
                p.add_(d.to(p.device, p.dtype))
        return True

    def subgroup(self, positions: Sequence[int]) -> list[str]:
        """The peer ids at ``positions`` of :attr:`members`, in group order; ValueError unless they
        are 2+ distinct valid positions including this replica's."""
        picked = sorted({int(i) for i in positions})
        if any(not 0 <= i < len(self.members) for i in picked):
            raise ValueError(f"member positions {list(positions)} outside the group of {len(self.members)}")
        ids = [self.members[i] for i in picked]
        if len(ids) < 2 or self.peer_id() not in ids:
            raise ValueError(f"a subgroup needs 2+ members including this one ({self.peer_id()}); got {ids}")
        return ids

    def _start(self, kind: str, step: int, own: list[torch.Tensor] | None = None,
               group: list[str] | None = None) -> None:
        """Start one all-reduce of the buffers tagged (``kind``, ``step``) among ``group`` (default:
        every member); one at a time."""
        from hivemind.utils.timed_storage import get_dht_time

        if self._pending is not None:  # rounds never overlap (they share the buffers): one nobody finished ends first
            self._finish(None)
        gather = [kind, step, group or self.members]
        try:
            if not self.members:
                raise RuntimeError("the averaging group is not known yet: call set_members() first")
            # scheduled now: hivemind's default (now + its matchmaking time, 5 s) must fit in the timeout
            control = self.averager.step(gather=gather, scheduled_time=get_dht_time(), timeout=self.timeout_s,
                                         allow_retries=False, wait=False)
        except Exception as exc:  # noqa: BLE001 -- hivemind raises many kinds; a failed round is data
            log.warning("averaging failed to start: %s", exc)
            control = None
        self._pending = (kind, control, gather, own)

    def _finish(self, abort) -> bool:
        """True when the pending round's buffers now hold the group mean of rounds with the same
        tag (what is averaged, the step). The tag names the round's group (fixed_group.py), so
        members meet only in the round they all mean; the gathered tags are checked again anyway: a
        group that mixed tags would be void for every member, none copies the buffers back."""
        _, control, gather, _ = self._pending
        self._pending = None
        result = None
        if control is not None:
            try:
                result = self._wait(control, abort or (lambda: False))
            except Exception as exc:  # noqa: BLE001 -- hivemind raises many kinds; a failed round is data
                log.warning("averaging round %s@%s failed: %s", gather[0], gather[1], str(exc) or repr(exc))
        if result is not None and any(list(v) != gather for v in result.values()):
            log.warning("averaging round void: the group mixed rounds %s", sorted({tuple(v) for v in result.values()}))
            result = None
        if result is None:
            self.num_failed += 1
            return False
        self.num_ok += 1
        return True

    @staticmethod
    def _wait(control, abort):
        """The round's result as soon as it ends (a blocking wait: the 50 ms sleep-poll it
        replaces made a 2-replica round on loopback take 154 ms instead of 92, medians measured on
        a 2-core box); ``abort()`` is polled every 50 ms meanwhile and cancels the round (None)."""
        while True:
            try:
                return control.result(timeout=0.05)
            except TimeoutError:  # concurrent.futures' wait timed out -- or the round itself did
                if control.done():
                    # ended just after the wait gave up (then this is its result), or timed out
                    # itself (this raises that): not the wait's own timeout, which failed ~1 in 300
                    # rounds of a 2-replica job whose rounds had all succeeded
                    return control.result(timeout=0)
            if abort():
                control.cancel()
                log.info("averaging aborted (the attempt is being fenced); local values kept")
                return None

    def shutdown(self, timeout_s: float = 3.0) -> None:
        """Stop the averager and DHT processes; SIGKILL them if they linger.

        They are forked children: they inherit the host process's signal handlers, so the
        SIGTERM hivemind uses as a last resort may not end them.
        """
        for proc, stop in ((self.averager, self.averager.shutdown), (self.dht, self.dht.shutdown)):
            _stop(proc, stop, timeout_s)


def _stop(proc, stop, timeout_s: float) -> None:
    """Ask a hivemind process to stop (``stop()``), then SIGKILL it if it lingers."""
    try:
        stop()
    except Exception as exc:  # noqa: BLE001 -- still make sure the process is gone
        log.debug("hivemind shutdown: %s", exc)
    proc.join(timeout_s)
    if proc.is_alive() and proc.pid is not None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.join(timeout_s)


async def _routing_peers(dht, node) -> list:
    return list(node.protocol.routing_table.peer_id_to_uid.keys())
