"""Spot checks of served chains: replay on another chain or the referee, second opinion, quarantine.

Protocol (coordinator side; the commitments and the decision are swarm/inference/verify.py):

- While a model is served with ``--verify-prob`` p > 0, every step asks its chain for
  commitments of every entry, so a stage cannot tell which of its steps are checked.
- The unit sampled is a **check window**: a run of a session's consecutive steps, as long as the
  context it starts at, within [MIN_WINDOW_TOKENS, MAX_WINDOW_TOKENS], stretched over the
  session's last steps when fewer than MIN_WINDOW_TOKENS would be left (:func:`window_step`;
  a step that resets the session's caches, a new chain, starts one). At a window's first step
  the replica's driver draws it checked with probability p (a generator seeded from the OS,
  unknown to the nodes). Every step of a checked window is held (:meth:`Checks.hold`: its token
  and every later one wait) and checked; a step of an unchecked window is not. A given step is
  still checked with probability p, as when steps were sampled one by one; what changed is the
  cost: one replay of a context of ~c tokens checks ~c steps, so the expected replay tokens per
  generated token are about p x (context at the window's end) / (window), at most ~2p while
  contexts stay within MAX_WINDOW_TOKENS (per-step sampling, one replay per 32 steps, cost
  ~1.2 replay tokens per generated token at p = 0.05 on 48-token sessions: docs/benchmarks.md).
- A window's held steps are checked together by one replay (:meth:`Checks.begin`): its
  context (prompt + tokens up to its latest held step) is prefilled as a temporary session
  (an ordinary random id) on another ready chain of the model, riding in that chain's next
  batch (:class:`CheckTask`), and every stage of that chain commits to the rows of the held
  steps (``commit_points``; the prefill computes every row anyway), the last stage also to the
  token each row gives. The replay is sent when :func:`replay_due` says so: at the window's
  last step, when the session can generate no further (max_new_tokens, eos), or when the batch
  is full. Each held step is compared on its own (``agree``): its serving chain's commitments
  of that step against the replay's at that row.
- When they disagree, the coordinator recomputes the context from the checkpoint it serves
  (:class:`Referee`, CPU float32; between two chains only on disagreement) and ``resolve`` decides: a node whose
  own commitment is wrong is quarantined (the registry's state ``quarantined`` with the
  reason: it gets no new work), a chain judged wrong is failed (its sessions are replayed,
  prompt + released tokens, on a healthy chain: the client sees a pause), and the held token
  is released only when the serving chain was right.
- A session's checks conclude in step order (``_drain``): once one fails, its chain is retired
  and the later ones are void. A stage after the first is blamed on a step only if every earlier
  step of the session on that chain was checked (``ChainResult.fresh``): otherwise its cache may
  hold a wrong input of an unchecked step, and the chain is only retired. Replays are fresh.
- Probation (swarm/inference/probation.py; the book: coordinator/inference/probation.py): every
  concluded check goes through ``Probations.after_check``. The nodes of a chain a check retired
  without a culprit go on probation; while a chain holds one (:meth:`Checks.watched`) every window
  of its sessions is drawn checked (p = 1 for that chain, ``Replica._draw``): a session attached
  after that is checked from its first step, so a faulty later stage is blamed as above. A node
  leaves probation after PROBATION_WINDOWS passed windows (the replay's last held step,
  ``window_done``) on fresh, unpushed chains, twice as many at each new probation. Probation only
  costs checks; quarantine comes from ``resolve`` alone. Replays prefer chains without such nodes.
- Disaggregated models (disagg.py): replays ride on the prefill chains first (compute-rich, idle
  between prompts: the natural checkers of the decode chains' steps), then on the others. A
  prefill chain's own step (the prompt's prefill and its first token) is replayed when the
  session is handed off, on another chain; the session decodes meanwhile, its first token held,
  and the check concludes after the move (``Session.handed_off_from``): passed, the token is
  released wherever the session is; failed, the prefill chain is retired and the session, whose
  decode caches began with that chain's KV, is replayed from its released tokens. A decode
  chain's caches begin with pushed KV (``ChainResult.cache_pushed``): a stage's wrong output
  from a right input may be the pusher's. Each accepted hand-off carries both ends' commitment
  to what moved (``ChainResult.pushed_kv``, swarm/inference/kv_receipt.py), so the referee also
  recomputes the KV the pushed positions should hold (referee.py ``kv_reference``): a wrong
  pushed cache blames its pusher, a right one leaves the output the decode stage's own (verify.py
  ``judge``). Without a commitment to weigh it is not blamed (the chain is retired and the node
  avoided for a while, ``engine.suspect``); a wrong token from right logits still is.
- Without another ready chain with room (one replica, or the others full) the window is
  replayed on the **referee** instead (:meth:`Checks._referee_replay`, coordinator/inference/
  referee.py): one CPU float32 prefill of the context from the checkpoint gives every held row's
  boundary sketches and allowed tokens, and each held step is judged against them alone
  (``resolve_by_reference``: the stage whose own output is wrong is quarantined, the chain is
  failed, its sessions replayed on a healthy or re-placed chain, the token released only when
  right), concluding in step order as above. Where it runs is swarm/inference/referee.py
  ``choose_checker``: a chain with room first (a prefill riding in its batch); a full chain is
  not waited for (a slot frees only when one of its sessions ends, all the while the tokens are
  held), so the referee whenever it may; else void. The referee is bounded per model by a
  budget of replay tokens per second (``TokenBudget``; default REFEREE_FLOPS_PER_S over the
  model's size, ~1.4 tokens/s for 7B parameters) and, all models together, by MAX_REFEREE_QUEUE
  replays waiting; it runs on its own worker thread, never on a gRPC or driver thread. Over
  budget the window is void and counted (``num_referee_void``; its steps in ``num_checks_void``).
- The check is void and the token released unchecked when nobody can replay it (no chain with
  room, the referee over budget or off), or when the checking chain fails before answering (or
  the referee cannot recompute). While a model has no other ready chain and no referee budget
  (``referee_tokens_per_s=0``), its steps ask no commitments and draw no checks
  (:meth:`Checks.can_check`): they could only be void.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from coordinator.inference.probation import Probations
from coordinator.inference.referee import Referee, RefereeReplays, kv_reference
from swarm.clock import SystemClock
from swarm.inference.commit_sig import COMMIT_KEY_BYTES, derive_commit_key
from swarm.inference.referee import REFEREE_FLOPS_PER_S
from swarm.inference.stage_runtime import StepEntry
from swarm.inference.verify import ChainResult, Reference, agree, resolve, resolve_by_reference

log = logging.getLogger(__name__)

_WAITING = object()  # a check slot whose other chain has not answered yet
# The checker of a window the referee replayed, for probation (it holds no node, so it blames none)
REFEREE_CHAIN = ChainResult(replica=-1, stages=(), token=-1)


# Check windows: the unit sampled (issue 13). A window is a run of a session's consecutive steps,
# as long as the context it starts at (so that its replay, a prefill of the context up to the
# window's end, costs at most about 2 replay tokens per token of the window), but at least
# MIN_WINDOW_TOKENS (a short prompt would otherwise make windows of a step or two) and at most
# MAX_WINDOW_TOKENS (tokens held back: a checked window reaches the client when its replay passed).
MIN_WINDOW_TOKENS = 32
MAX_WINDOW_TOKENS = 64
REPLAY_WINDOW_TOKENS = MIN_WINDOW_TOKENS  # the most tokens held back by default (replay_due)
MAX_REPLAY_POINTS = MAX_WINDOW_TOKENS  # sampled steps one replay checks (node side accepts up to 256)


def window_tokens(context_len: int, steps_left: int) -> int:
    """Length, in steps, of the check window that starts at a step whose context (the rows
    computed, prompt included) is ``context_len`` tokens, ``steps_left`` steps (this one
    included) before the session's max_new_tokens: the context's length, clamped to
    [MIN_WINDOW_TOKENS, MAX_WINDOW_TOKENS], and stretched (up to MAX_WINDOW_TOKENS) over the
    session's last steps when fewer than MIN_WINDOW_TOKENS would be left after it: a short
    last window would cost a prefill of the whole context for a few steps."""
    if context_len < 1 or steps_left < 1:
        raise ValueError(f"a check window starts at a context of at least one token and a step to take, "
                         f"got context {context_len}, {steps_left} steps left")
    w = max(MIN_WINDOW_TOKENS, min(MAX_WINDOW_TOKENS, context_len))
    if steps_left - w < MIN_WINDOW_TOKENS:
        w = max(w, min(steps_left, MAX_WINDOW_TOKENS))
    return w


def window_step(*, position: int, window_end: int | None, reset: bool, steps_left: int) -> int | None:
    """Where a session's check window ends (exclusive, a row position) after its step whose last
    row is ``position`` (``steps_left``: as in :func:`window_tokens`), when that step starts a
    new window; None while the current window (ending at ``window_end``) goes on. A step that
    resets the session's caches (a new chain) starts a window; so does the first step past the
    previous window."""
    if reset or window_end is None or position >= window_end:
        return position + window_tokens(position + 1, steps_left)
    return None


def replay_due(*, num_points: int, first_position: int, position: int, runnable: bool,
               window_tokens: int = REPLAY_WINDOW_TOKENS) -> bool:
    """Whether a session's batch of ``num_points`` unsent held steps (the oldest at
    ``first_position``; the session is now at ``position``) is to be replayed now: when the
    oldest has held ``window_tokens`` tokens back (its window ended), when the session cannot
    generate further (``runnable`` False: nothing more would join, and its last tokens wait), or
    when it is full. Not earlier near the session's end: a replay sent a few steps before the
    end would need a second prefill of the whole context for the steps after it (measured: it
    made the last window cost twice), against one replay's wait at the end."""
    if num_points <= 0:
        return False
    return not runnable or position - first_position >= window_tokens or num_points >= MAX_REPLAY_POINTS


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckTask:
    """A replay riding in another chain's next step: ``entry`` is a reset entry of the checked
    context, ``points`` the positions of the rows checked; ``done`` gets that chain's
    :class:`ChainResult` per point, or None when it could not run it."""

    entry: StepEntry
    points: tuple[int, ...]
    done: Callable[[dict[int, ChainResult] | None], None]


class Checks:
    """Spot checks of one engine's chains (``engine``: coordinator.inference.engine.InferenceEngine)."""

    def __init__(self, engine, probation: Probations | None = None, *, clock=None,
                 referee_tokens_per_s: float | None = None, referee_flops_per_s: float = REFEREE_FLOPS_PER_S) -> None:
        """``referee_tokens_per_s``: every model's budget of window replays on the referee (0: none,
        a model without another ready chain goes unchecked); None: from each model's size and
        ``referee_flops_per_s`` (``--referee-gflops``; swarm/inference/referee.py)."""
        self.engine = engine
        self.referee = Referee()
        self.probation = probation or Probations()
        self.replays = RefereeReplays(self.referee, clock or SystemClock(), tokens_per_s=referee_tokens_per_s,
                                      flops_per_s=referee_flops_per_s)
        # the nodes' commit keys derive from it (swarm/inference/commit_sig.py); a restarted
        # coordinator has a new one, and its stages get their new keys when they confirm again
        self._commit_secret = secrets.token_bytes(COMMIT_KEY_BYTES)

    def close(self) -> None:
        self.replays.close()

    def public_key(self, node_id: str) -> bytes:
        """The identity key ``node_id`` registered (a stage without a commit key signs with it)."""
        return self.engine.app.registry.public_key(node_id)

    def commit_key(self, model: str, node_id: str, stage: int) -> bytes:
        """The key ``node_id`` authenticates its commitments for ``stage`` of ``model`` with
        (handed to that node alone, in its ConfirmAssignment reply)."""
        return derive_commit_key(self._commit_secret, node_id=node_id, model=model, stage=stage)

    def watched(self, serving) -> bool:
        """Whether ``serving`` holds a node on probation: every window of its sessions is checked."""
        return bool(self.probation.of(serving.node_ids))

    def can_check(self, serving) -> bool:
        """Whether a step of ``serving`` could be checked now: another chain of its model is
        ready, or the model may use the referee (a budget above 0; over it for now, windows are
        drawn and void, counted). Without either every check is void, so the driver asks no
        commitments (they cost the stages a sketch per step) and draws no checks."""
        try:
            m = self.engine.get(serving.model)
        except Exception:  # noqa: BLE001 -- unserved meanwhile
            return False
        return any(r is not serving and r.state == "ready" for r in list(m.replicas)) or self.replays.enabled(m)

    @staticmethod
    def checked_step(s, e: StepEntry, *, checking: bool, draw: Callable[[], bool]) -> bool:
        """Whether the step ``e`` just taken by session ``s`` is checked: it falls in a checked
        window, drawn (``draw``) at the window's first step (:func:`window_step`). While no check
        can run (``checking`` False) none is, and the next window starts when one can."""
        if not checking:
            s.window_end = None
            return False
        st = s.state
        end = window_step(position=e.start_position + e.num_tokens - 1, window_end=s.window_end, reset=e.reset,
                          steps_left=max(1, st.params.max_new_tokens - len(st.generated) - len(s.pending)))
        if end is not None:  # a new window: checked (every step of it) or not, as a whole
            s.window_end, s.window_checked = end, draw()
        return s.window_checked

    def hold(self, serving, s, ticket: object, *, context: tuple[int, ...], token: int, result: ChainResult) -> None:
        """Hold a sampled step of session ``s`` on ``serving`` (its token is ``token``, ``context``
        ends with the step's last input row) until its batch is replayed (:meth:`begin`) and judged."""
        slot = [serving, ticket, context, token, result, _WAITING]
        with s.check_lock:
            s.check_slots.append(slot)
        s.check_batch.append(slot)

    def due(self, s, *, runnable: bool) -> bool:
        """:func:`replay_due` for session ``s``'s unsent batch."""
        b = s.check_batch
        if not b:
            return False
        first = len(b[0][2]) - 1  # the window's first step: every step of a checked window is held
        window = s.window_end - first if s.window_end is not None and s.window_end > first else REPLAY_WINDOW_TOKENS
        return replay_due(num_points=len(b), first_position=first, position=len(s.ids()) - 1, runnable=runnable,
                          window_tokens=window)

    def void(self, s) -> None:
        """The session left its chain (failed, cancelled, closed): its unsent checks are void."""
        batch, s.check_batch = s.check_batch, []
        if batch:
            m = self._model(s)
            for slot in batch:
                slot[5] = None
            if m is None:
                self._forget(s, batch)
            else:
                self.engine._pool.submit(self._drain, m, s)

    @staticmethod
    def _forget(s, batch: list) -> None:
        with s.check_lock:
            for slot in batch:
                if slot in s.check_slots:
                    s.check_slots.remove(slot)

    def _model(self, s):
        try:
            return self.engine.get(s.model)
        except Exception:  # noqa: BLE001 -- unserved meanwhile
            return None

    def begin(self, serving, s) -> None:
        """Replay session ``s``'s batch of held steps on another chain than ``serving`` (a Replica)
        with room, else on the referee within its budget, else void; each held token is released
        (``serving.release``) or withheld when its check ends."""
        batch, s.check_batch = s.check_batch, []
        if not batch:
            return
        m = self._model(s)
        if m is None:
            self._forget(s, batch)
            for slot in batch:
                serving.release(s, slot[1])  # unserved meanwhile: nothing to check against
            return
        prefill = self.engine.disagg.prefill_indices(m)  # checkers first (empty unless disaggregated)
        others = sorted((r for r in list(m.replicas) if r is not serving and r.state == "ready"),
                        key=lambda r: (self.watched(r), r.index not in prefill, r.num_sessions, r.index))

        def done(results: dict[int, ChainResult] | None) -> None:  # on the other chain's driver: hand off
            for slot in batch:
                slot[5] = None if results is None else results.get(len(slot[2]) - 1)
            self.engine._pool.submit(self._drain, m, s)

        context = batch[-1][2]  # the others are its prefixes
        batch[-1].append(True)  # the window's last held step: it concludes the window (probation counts)
        entry = StepEntry(session_id=uuid.uuid4().hex, start_position=0, num_tokens=len(context),
                          token_ids=context, reset=True, sampling=s.state.params)
        task = CheckTask(entry=entry, points=tuple(len(slot[2]) - 1 for slot in batch), done=done)
        if any(r.add_check(task) for r in others):
            return
        if self.replays.submit(m, len(context), lambda: self._referee_replay(m, batch, task.points, context, s)):
            return
        if self.replays.enabled(m):
            with self.engine._lock:
                m.num_referee_void += 1
        done(None)  # nobody to check against: void, released unchecked (in its turn)

    def _referee_replay(self, m, batch: list, points: tuple[int, ...], context: tuple[int, ...], s) -> None:
        """On the referee's worker: recompute the window's rows and conclude its checks as a
        replay's answer would (a failed recomputation voids them)."""
        bounds = {st.last_layer_excl for st in batch[0][4].stages}  # the serving chain's boundaries
        try:
            refs = self.referee.references(m.record.dir, m.record.digest, num_layers=m.config.num_layers,
                                           boundaries=bounds, context=context, points=points,
                                           params=s.state.params)
        except Exception:  # noqa: BLE001 -- void, as when a checking chain fails before answering
            log.exception("the referee could not replay a window model=%s", m.record.name)
            refs = {}
        kv = kv_reference(self.referee, m, batch[0][4], context) if refs else {}
        for slot in batch:
            ref = refs.get(len(slot[2]) - 1)
            slot[5] = replace(ref, kv=kv) if ref is not None and kv else ref
        self.engine._pool.submit(self._drain, m, s)

    def _drain(self, m, s) -> None:
        """Conclude the session's checks in step order: a later step's check is judged only after
        the earlier ones (their failure retires the chain, which voids the later ones)."""
        retire: list[tuple[object, str]] = []
        with s.check_lock:
            while s.check_slots and s.check_slots[0][5] is not _WAITING:
                slot = s.check_slots.popleft()
                serving, ticket, context, token, result, other = slot[:6]
                try:
                    retire += self._judge(m, serving, s, ticket, context, token, result, other,
                                          window_done=len(slot) > 6)
                except Exception:  # noqa: BLE001 -- a bug must not leave the session held forever
                    log.exception("spot check failed to conclude model=%s replica=%d", m.record.name, serving.index)
                    retire.append((serving, "internal error in a spot check; see the coordinator's log"))
                for r, _ in retire:
                    r.state = "failing"  # not ready: later checks of its steps are void
        # outside the lock: fail() waits for the chain's driver, which may be queueing a check
        for r, reason in retire:
            r.fail(reason)  # its sessions fail over, with what they held dropped

    def _judge(self, m, serving, s, ticket, context, token, result: ChainResult, other: ChainResult | None, *,
               window_done: bool = False) -> list[tuple[object, str]]:
        """Conclude one check; returns the chains to fail, with the reason. ``window_done``: the last
        held step of its replay (a passed window, for probation, when it passes)."""
        e = self.engine
        moved = s.handed_off_from is serving and s.replica is not serving  # a prefill's step, handed off since
        if not moved and (serving.state != "ready" or s.replica is not serving):
            return []  # the chain failed or the session moved: what it held is dropped, the replay recomputes it
        release = (lambda: _release_moved(s, ticket)) if moved else (lambda: serving.release(s, ticket))
        if isinstance(other, Reference):
            return self._judge_by_referee(m, s, result, other, release, moved, window_done=window_done)
        if other is None or not any(r.index == other.replica and r.state == "ready" for r in list(m.replicas)):
            # no answer, or the checking chain was retired since (a check of this batch found it
            # wrong): void, as when it fails before answering; a window's later steps would
            # otherwise each cost a recomputation against the same wrong chain
            with e._lock:
                m.num_checks_void += 1
            release()
            return []
        ref = None
        if not agree(result, other):
            chains = [r for r in list(m.replicas) if r.index in (result.replica, other.replica)]
            bounds = {st.last_layer_excl for r in chains for st in r.stages}
            bounds |= {st.last_layer_excl for st in result.stages + other.stages}
            try:
                ref = self.referee.reference(m.record.dir, m.record.digest, num_layers=m.config.num_layers,
                                             boundaries=bounds, context=context, params=s.state.params)
            except Exception:  # noqa: BLE001 -- no second opinion: resolve retires the serving chain
                log.exception("the referee could not recompute model=%s", m.record.name)
            kv = kv_reference(self.referee, m, result, context) if ref is not None else {}
            if kv:
                ref = replace(ref, kv=kv)
        outcome = resolve(result, other, ref)
        with e._lock:
            m.num_checks += 1
            m.num_check_failures += outcome.disputed
        if outcome.disputed:
            log.warning("spot check disagreement model=%s replicas=%d,%d: %s", m.record.name, result.replica,
                        other.replica, outcome.reason)
        self.probation.after_check(model=m.record.name, serving=result, checker=other, outcome=outcome,
                                   window_done=window_done)
        return self._carry_out(m, s, result, other, outcome, release, moved)

    def _judge_by_referee(self, m, s, result: ChainResult, ref: Reference, release, moved: bool, *,
                          window_done: bool) -> list[tuple[object, str]]:
        """Conclude one check whose window the referee replayed: the serving chain against the
        recomputation alone (``resolve_by_reference``)."""
        outcome = resolve_by_reference(result, ref)
        with self.engine._lock:
            m.num_checks += 1
            m.num_check_failures += outcome.disputed
            m.num_referee_checks += 1
        if outcome.disputed:
            log.warning("referee check failed model=%s replica=%d: %s", m.record.name, result.replica, outcome.reason)
        self.probation.after_check(model=m.record.name, serving=result, checker=REFEREE_CHAIN, outcome=outcome,
                                   window_done=window_done)
        return self._carry_out(m, s, result, REFEREE_CHAIN, outcome, release, moved)

    def _carry_out(self, m, s, result: ChainResult, other: ChainResult, outcome, release, moved: bool
                   ) -> list[tuple[object, str]]:
        """Quarantine, avoid, release or replay as ``outcome`` says; returns the chains to fail."""
        e = self.engine
        for node_id, reason in outcome.quarantine:
            if e.app.registry.quarantine(node_id, reason):
                log.warning("quarantined node=%s model=%s: %s", node_id[:12], m.record.name, reason)
            e.suspect(node_id)
        for chain in (result, other):  # retired without a culprit: avoid its nodes for a while
            unsigned = not all(st.authentic for st in chain.stages)  # a relaying stage altered commitments
            if (chain.cache_pushed or unsigned) and chain.replica in outcome.retire and not outcome.quarantine:
                for st in chain.stages:
                    e.suspect(st.node_id)
        if outcome.release:
            release()
        elif moved:
            e.disagg.replay(m, s)  # its decode caches began with the wrong chain's KV
        return [(r, f"spot check: {outcome.reason}") for r in list(m.replicas)
                if r.index in outcome.retire and r.state == "ready"]


def _release_moved(s, ticket: object) -> None:
    """Release a held token of a session that moved since (disaggregated hand-off): flag it, and let
    the chain it is on now flush (while its KV is moving, disagg.py flushes once it is attached)."""
    for p in list(s.pending):
        if p[1] is ticket:
            p[2] = True
    holder = s.replica
    if holder is not None:
        holder.release(s, ticket)
