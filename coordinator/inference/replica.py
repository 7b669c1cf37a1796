"""One replica of a served model: a chain of stages and the loop that drives its sessions.

Protocol (coordinator side): a driver thread repeatedly takes every session of the replica and
sends one step to the first stage (prefill entries for sessions the chain has not seen,
one-token decode entries for the rest) on its persistent link (swarm/transport/step_link.py:
the stage's step wire, else its ``StepStream``; one message each way per token, no call setup),
and hands each sampled token to its session (coordinator/inference/sessions.py).
With spot checks on (``--verify-prob``, coordinator/inference/checks.py) every step asks the
stages for commitments; each session's steps fall in check windows (checks.py ``window_step``),
each drawn checked with probability ``verify_prob`` at its first step; every token of a checked
window is held, with every token the session generates after it (the session keeps decoding:
its ``pending`` tokens), until its check passed; a window is replayed once (``replay_due``);
a failed chain drops what it held (the session replays from its released tokens). Replays of
other chains' checked steps (:class:`CheckTask`) ride in this chain's next step as temporary
sessions committing to the checked rows (``commit_points``), closed in the step after.
Sessions that finished are closed on the stages in the next step (``close_session_ids``), or
directly when the replica goes idle. A step that fails because a stage is unreachable marks
the replica failed and hands its sessions back to the engine, which replays them elsewhere.

Session slots: a chain's stages hold at most ``max_sessions`` sessions each, and a stage that is
asked for more refuses (CapacityError, which fails the step). So the chain counts as used (``_used``)
not only its sessions but every session its stages hold or are promised: the next step's check
replays, sessions whose KV is being moved in (disaggregated serving, ``reserve``), and sessions
closed here that the stages free only when the next step or an idle close reaches them; when
those are freed, the engine is told (``on_finish(replica, None)``) to attach waiting sessions.

All sessions of a replica travel as one batch, one step in flight. (``--lanes``, which split
them into groups pipelined through the chain, was removed: on a device shared by the stages
the groups only serialise there again, in smaller batches; docs/benchmarks.md, issue 16.)
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable

from coordinator.inference.sessions import Session, StageRef
from coordinator.inference.stage_calls import StageCalls
from swarm.errors import InvalidRequestError, NotFoundError, SwarmError
from swarm.inference.commit_sig import NONCE_BYTES, authentic_stages
from swarm.inference.session import TokenEvent
from swarm.inference.stage_runtime import StepEntry
from swarm.inference.verify import ChainResult, StageCommit
from swarm.proto.v1 import inference_pb2 as pb
from swarm.steptrace import StepTrace
from swarm.transport.inference import (commitments_from_pb, entries_to_pb, new_step_capability,
                                       point_commitments_from_pb)
from swarm.transport.step_link import StepLink
from swarm.transport.step_wire import wire_target

log = logging.getLogger(__name__)
_TRACE = StepTrace("coordinator")  # SWARM_STEP_TRACE=DIR: per-step timestamps (swarm/steptrace.py)

STEP_TIMEOUT_S = 120.0


class Replica:
    """A chain of stages serving one model, with its driver thread."""

    def __init__(
        self,
        *,
        model: str,
        index: int,
        stages: list[StageRef],
        max_sessions: int,
        on_failure: Callable[["Replica", list[Session], str], None],
        on_finish: Callable[["Replica", Session | None], None],
        predicted_latency_s: float = 0.0,
        security=None,
        checks=None,
        verify_prob: float = 0.0,
        on_decode_step: Callable[[list[StageRef], list[StepEntry], list[float]], None] | None = None,
    ) -> None:
        """``checks`` (coordinator.inference.checks.Checks) and ``verify_prob``: spot checks of a
        fraction of the session steps (none without ``checks`` or at 0). ``on_decode_step``: called
        after each decode step with the stages, the entries and each stage's compute time, first
        stage first (coordinator/inference/memwatch.py). ``on_finish``: called when a session
        finished, and with None when slots its stages held (closed sessions, check replays) are
        free again: the engine attaches waiting sessions then."""
        self.model = model
        self.index = index
        self.stages = stages
        self.max_sessions = max_sessions
        self.predicted_latency_s = predicted_latency_s
        self.state = "loading"
        self._on_failure = on_failure
        self._on_finish = on_finish
        self._on_decode_step = on_decode_step
        self._sessions: list[Session] = []
        self._closing: list[str] = []
        self._tasks: list = []  # CheckTasks (other chains' replays) for the next step
        # sessions whose KV is being moved here (disaggregated serving): on the stages before attach()
        self._incoming = 0
        # sessions the step in flight closes or opens for a check replay: still on the stages until it ran
        self._in_step = 0
        self._checks = checks
        self.verify_prob = verify_prob if checks is not None else 0.0
        self._rng = random.Random(secrets.randbits(64))  # which steps are checked: unknown to the nodes
        self._cond = threading.Condition()
        self._stop = False
        # the chain's secret: issued to every stage with its assignment, sent on every stage call
        self.capability = new_step_capability()
        self._security = security  # TLS as the coordinator (swarm://coordinator), also for the step wire
        self.calls = StageCalls(model=model, index=index, stages=stages, security=security, capability=self.capability)
        self._thread: threading.Thread | None = None
        self._failing = False
        self.steps = 0
        self.tokens = 0
        self._replays = 0

    # ------------------------------------------------------------------ membership
    @property
    def node_ids(self) -> list[str]:
        return [s.node_id for s in self.stages]

    @property
    def num_sessions(self) -> int:
        with self._cond:
            return len(self._sessions)

    def _used(self) -> int:
        """Session slots its stages hold or are promised (under the lock): sessions, the next
        step's check replays, sessions whose KV is being moved in (held before they attach), and
        sessions finished or replayed here that the stages free only when the next step (or an
        idle close) reaches them."""
        return len(self._sessions) + len(self._tasks) + self._incoming + len(self._closing) + self._in_step

    def has_room(self) -> bool:
        with self._cond:
            used = self._used()
        return self.state == "ready" and used < self.max_sessions

    def add_check(self, task) -> bool:
        """Run ``task`` (a CheckTask) in the next step; False when this chain cannot (not ready,
        stopping, or its stages have no session slot left for it)."""
        with self._cond:
            if self._stop or self.state != "ready" or self._used() >= self.max_sessions:
                return False
            self._tasks.append(task)
            self._cond.notify_all()
        return True

    def reserve(self) -> bool:
        """Hold a session slot for a session whose KV is about to be moved here (its stages take it
        in before :meth:`attach`); False when there is none. Give it back with :meth:`unreserve`
        once the session attached or the move failed."""
        with self._cond:
            if self._stop or self.state != "ready" or self._used() >= self.max_sessions:
                return False
            self._incoming += 1
        return True

    def unreserve(self) -> None:
        with self._cond:
            self._incoming = max(0, self._incoming - 1)

    def release(self, s: Session, ticket: object) -> None:
        """A held token's check passed (or was void): give the client every pending token up to
        the next one still checked. Ignored when the session moved meanwhile (its chain failed:
        it is replayed elsewhere and what was pending is gone)."""
        with self._cond:
            if s.replica is not self or s.closed:
                return
            for p in s.pending:
                if p[1] is ticket:
                    p[2] = True
            events = self._flush(s)
            self._cond.notify_all()
        for ev in events:
            self._deliver(s, ev)

    def _flush(self, s: Session) -> list[TokenEvent]:
        """Release the front of ``s.pending`` that needs no more checking (under the lock)."""
        events = []
        while s.pending and (s.pending[0][1] is None or s.pending[0][2]):
            token = s.pending.pop(0)[0]
            if s.state.done:  # finished (a stop string) before it: what was generated past it is dropped
                s.pending.clear()
                break
            events.append(s.state.push(token))
        return events

    def _drop_tasks(self) -> None:
        with self._cond:
            tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.done(None)

    def attach(self, s: Session) -> None:
        with self._cond:
            s.replica = self
            self._sessions.append(s)
            self._cond.notify_all()

    def start(self) -> None:
        self.state = "ready"
        self._thread = threading.Thread(target=self._run, name=f"replica-{self.model}-{self.index}", daemon=True)
        self._thread.start()

    def stop(self, *, unload: bool = True) -> list[Session]:
        """Stop the driver; returns the sessions still attached (the caller re-homes them)."""
        with self._cond:
            self._stop = True
            left, self._sessions = self._sessions, []
            self._cond.notify_all()
        self._join()
        self._drop_tasks()
        self._void(left)
        if unload:
            self.calls.unload()
        self.calls.close()
        return left

    def probe(self, timeout_s: float = 2.0, retry_timeout_s: float = 6.0) -> list[str]:
        """Node ids of the chain's stages that do not answer (stage_calls.py ``StageCalls.probe``)."""
        return self.calls.probe(timeout_s, retry_timeout_s)

    # ------------------------------------------------------------------ driver
    def _join(self) -> None:
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=STEP_TIMEOUT_S)

    def _run(self) -> None:
        # the persistent step stream to the first stage (opened on the first step)
        first = self.stages[0]
        stub = self.calls.stubs[0]
        link = StepLink(lambda requests, metadata: stub.StepStream(requests, metadata=metadata),
                        metadata=self.calls.metadata, what=f"first stage of replica {self.index}",
                        wire=wire_target(self._security, first.address, first.node_id, stub))
        try:
            self._drive(link)
        finally:
            link.close()

    def _drive(self, link: StepLink) -> None:
        while True:
            with self._cond:
                idle = not self._sessions and not self._closing and not self._tasks
            if idle:
                link.close()  # an idle replica holds no stream (nor a server thread) on its first stage
            with self._cond:
                # also closes finished sessions when the replica is idle; sessions waiting for
                # their checks at max_new_tokens / eos sit out
                while not self._stop and not self._closing and not self._tasks and all(
                        not s.runnable() and not s.cancelled for s in self._sessions):
                    self._cond.wait(timeout=1.0)
                if self._stop:
                    return
                cancelled = [s for s in self._sessions if s.cancelled]
                for s in cancelled:
                    self._sessions.remove(s)
                    self._closing.append(s.id)
                    s.closed = True
                batch = [s for s in self._sessions if s.runnable()]
                closing, self._closing = self._closing, []
                tasks, self._tasks = self._tasks, []
                self._in_step = len(closing) + len(tasks)
            self._void(cancelled)
            try:
                self._drive_once(batch, closing, link, tasks)
            except _ReplicaDown as exc:
                for t in tasks:
                    t.done(None)
                self._fail(str(exc))
                return
            except Exception:  # noqa: BLE001 -- a bug must not kill the loop silently
                log.exception("replica step crashed model=%s replica=%d", self.model, self.index)
                for t in tasks:
                    t.done(None)
                with self._cond:
                    for s in batch:
                        if s in self._sessions:
                            self._sessions.remove(s)
                for s in batch:
                    s.fail(SwarmError("internal error while generating; see the coordinator's log"))

    def _drive_once(self, batch: list[Session], closing: list[str], link: StepLink, tasks: list) -> None:
        """One step (or, with nothing to step, the idle close of ``closing``); then the slots it
        closed count as free again (:meth:`_used`), and the engine may attach waiting sessions."""
        try:
            if batch or tasks:
                self._step(batch, closing, link, tasks)
            elif closing:
                self._close_idle(closing)
        finally:
            with self._cond:
                freed, self._in_step = self._in_step, 0
            if freed:
                self._on_finish(self, None)

    def fail(self, reason: str) -> None:
        """Declare the replica failed from outside its driver (a node of it went offline): its
        sessions go back to the engine, as after a failed step. Blocks until the driver stopped."""
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        """Declare the replica failed (once): stop the driver, let an in-flight step finish, then
        hand all sessions to the engine."""
        with self._cond:
            if self._failing:
                return
            self._failing = True
            self._stop = True
            self._cond.notify_all()
        self.state = "failed"
        self._join()
        with self._cond:
            left, self._sessions = self._sessions, []
        self._drop_tasks()
        self._void(left)
        log.warning("replica failed model=%s replica=%d sessions=%d reason=%s", self.model, self.index, len(left), reason)
        self._on_failure(self, left, reason)

    def _close_idle(self, ids: list[str]) -> None:
        self.calls.close_sessions(ids)

    def _step(self, batch: list[Session], closing: list[str], link: StepLink, tasks: list | None = None) -> None:
        tasks = tasks or []
        with self._cond:  # a release moves pending tokens to the state meanwhile
            entries = [s.entry() for s in batch] + [t.entry for t in tasks]
        # every entry commits while checks are on, so a stage cannot tell which steps are checked
        checking = self.verify_prob > 0 and self._checks.can_check(self)
        commit = [e.session_id for e in entries] if checking or tasks else []
        req = self._request(entries, closing, commit)
        req.commit_points.extend(pb.ServeCommitPoints(session_id=t.entry.session_id, positions=t.points) for t in tasks)
        nonce = secrets.token_bytes(NONCE_BYTES) if commit else b""  # the stages sign their commitments with it
        req.step_nonce = nonce
        t0 = time.perf_counter()
        try:
            reply = link.step(req, timeout_s=STEP_TIMEOUT_S)
            if _TRACE.enabled and entries:
                _TRACE.write((entries[0].session_id, entries[0].start_position), -1,
                             {"send": t0, "reply": _TRACE.now()}, model=self.model, entries=len(entries))
        except SwarmError as err:
            for t in tasks:  # void checks; the next step closes their sessions wherever they opened
                t.done(None)
            with self._cond:
                self._closing.extend(t.entry.session_id for t in tasks)
            if isinstance(err, InvalidRequestError) and "replay" in str(err) and self._replays < 2:
                # a stage lost a session's cache (expired or restarted): replay the batch, twice at most
                self._replays += 1
                for s in batch:
                    s.kv_pos = 0
                return
            if isinstance(err, InvalidRequestError):
                for s in batch:
                    self._drop(s)
                    s.fail(err)
                return
            if isinstance(err, NotFoundError) or err.retryable:
                raise _ReplicaDown(str(err)) from err
            raise _ReplicaDown(f"{type(err).__name__}: {err}") from err
        self._replays = 0
        if len(reply.token_ids) != len(entries):
            for t in tasks:
                t.done(None)
            raise _ReplicaDown(f"last stage returned {len(reply.token_ids)} tokens for {len(entries)} sessions")
        self.steps += 1
        self._observed(entries, reply, time.perf_counter() - t0)
        with self._cond:
            self._closing.extend(t.entry.session_id for t in tasks)  # temporary sessions
        signed = self._authentic(reply, nonce) if tasks else None
        for t in tasks:
            points = point_commitments_from_pb(reply, t.entry.session_id, list(t.points), len(self.stages))
            t.done({p: self._result(c, -1 if tok is None else tok, authentic=signed) for p, (c, tok) in points.items()})
        checks, out = [], []
        with self._cond:
            for s, e, tok in zip(batch, entries, reply.token_ids):
                if s.cancelled or s.closed or s.replica is not self:  # (left meanwhile: a check replays it)
                    continue
                s.kv_pos = e.start_position + e.num_tokens
                s.replay_stages = 0
                if e.reset:
                    s.history_checked = True  # the stages' caches of it hold this step only
                    s.kv_pushed = False
                    s.kv_receipts = ()
                ticket = None
                if self._checks is not None and self._checks.checked_step(
                        s, e, checking=checking, draw=self._draw):
                    ticket = object()  # held, with what follows, until the check passed (Checks.begin)
                    checks.append((s, ticket, tuple(s.ids()), int(tok), (s.history_checked, s.kv_pushed, s.kv_receipts)))
                else:
                    s.history_checked = False  # later steps ran on caches holding this unchecked one
                s.pending.append([int(tok), ticket, False])
                out.append((s, self._flush(s)))
        # parsed only for the sampled entries (every entry's were computed and sent: the stages
        # cannot tell which are checked; reading them all cost the coordinator on every step)
        commits = commitments_from_pb(reply, [c[0].id for c in checks], len(self.stages),
                                      num_committed=len(commit)) if checks else {}
        if checks and signed is None:
            signed = self._authentic(reply, nonce)
        for s, ticket, context, tok, (fresh, pushed, receipts) in checks:
            self._checks.hold(self, s, ticket, context=context, token=tok, result=self._result(
                commits[s.id], tok, fresh=fresh, pushed=pushed, pushed_kv=receipts, authentic=signed))
        if self._checks is not None:
            with self._cond:
                due = [s for s in batch if not s.closed and self._checks.due(s, runnable=s.runnable())]
            for s in due:
                self._checks.begin(self, s)
        for s, events in out:
            for ev in events:
                self._deliver(s, ev)
        self._hand_off(batch)

    def _hand_off(self, batch: list[Session]) -> None:
        """Detach the sessions of ``batch`` that carry a ``handoff`` and are still generating, and
        call it (disaggregated serving: their decoding continues on another chain)."""
        moved = []
        with self._cond:
            for s in batch:
                if s.handoff is not None and s.kv_pos > 0 and not s.closed and not s.cancelled and s in self._sessions:
                    self._sessions.remove(s)
                    s.replica = None
                    s.handed_off_from = self
                    moved.append(s)
        for s in moved:  # its held steps (the prefill's token) are replayed now and judged after the move
            if self._checks is not None:
                self._checks.begin(self, s)
        for s in moved:
            handoff, s.handoff = s.handoff, None
            handoff(self, s)

    def _draw(self) -> bool:
        """Whether a check window starting now is checked: always while the chain holds a node on
        probation (checks.py), else with probability ``verify_prob``."""
        return self._checks.watched(self) or self._rng.random() < self.verify_prob

    def _request(self, entries: list[StepEntry], closing: list[str], commit: list[str]) -> pb.ServeStepRequest:
        """The step sent to the first stage (a route driver adds its route: routes.py)."""
        return pb.ServeStepRequest(model_name=self.model, replica=self.index, stage=0,
                                   entries=entries_to_pb(entries, with_tokens=True),
                                   close_session_ids=closing, commit_session_ids=commit)

    def _observed(self, entries: list[StepEntry], reply: pb.ServeStepReply, elapsed_s: float) -> None:
        """A step of ``entries`` came back after ``elapsed_s``: a decode step's stage times go to
        ``on_decode_step`` (a route driver also records them in its live map)."""
        if self._on_decode_step is None or not entries or any(e.num_tokens != 1 for e in entries):
            return  # a prefill's time is compute-bound: it says nothing of memory bandwidth
        times = list(reply.stage_compute_s)[::-1]  # sent from the last stage back
        if len(times) == len(self.stages):
            self._on_decode_step(self.stages, entries, times)

    def _authentic(self, reply: pb.ServeStepReply, nonce: bytes) -> list[bool]:
        """Per stage, whether its commitments in ``reply`` carry its node's signature for this step
        (swarm/inference/commit_sig.py): the stages before it relay them."""
        return authentic_stages(reply, model=self.model, nonce=nonce, node_ids=[st.node_id for st in self.stages],
                                public_key=self._checks.public_key,
                                commit_key=lambda node_id, k: self._checks.commit_key(self.model, node_id, k))

    def _result(self, commits: list, token: int, *, fresh: bool = True, pushed: bool = False,
                pushed_kv: tuple = (), authentic: list[bool] | None = None) -> ChainResult:
        signed = authentic or [True] * len(self.stages)
        return ChainResult(replica=self.index, token=token, fresh=fresh, cache_pushed=pushed,
                           pushed_kv=pushed_kv if pushed else (), stages=tuple(
            StageCommit(node_id=st.node_id, first_layer=st.first_layer, last_layer_excl=st.last_layer_excl,
                        input=c[0], output=c[1], authentic=ok) for st, c, ok in zip(self.stages, commits, signed)))

    def _deliver(self, s: Session, ev: TokenEvent) -> None:
        if s.closed:
            return
        self.tokens += 1
        s.sink(ev)
        if ev.finish_reason is not None:
            s.closed = True
            self._drop(s)
            self._on_finish(self, s)

    def _drop(self, s: Session) -> None:
        with self._cond:
            if s in self._sessions:
                self._sessions.remove(s)
            self._closing.append(s.id)
        self._void([s])

    def _void(self, sessions: list[Session]) -> None:
        """Sessions leaving this chain: their unsent checks are void (what they held is dropped)."""
        if self._checks is not None:
            for s in sessions:
                self._checks.void(s)


class _ReplicaDown(Exception):
    pass


def wait_for(cond: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval_s)
    return cond()
