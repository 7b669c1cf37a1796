"""The coordinator's probation book (the decision is swarm/inference/probation.py; checks.py feeds it).

Protocol: every concluded spot check goes through :meth:`Probations.after_check`, which applies
``after_check`` to the book under a lock, logs who entered or left probation, and writes the
changed records to the model store (table ``inference_probation``), so a restarted coordinator keeps
watching the same nodes (and their strikes). Replica drivers ask :meth:`Probations.of` for their
chain's nodes at every check window's first step: a non-empty answer checks the window (p = 1).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from swarm.clock import Clock, SystemClock
from swarm.inference.probation import NodeProbation, after_check, on_probation
from swarm.inference.verify import ChainResult, Outcome

log = logging.getLogger(__name__)


class Probations:
    """Nodes on probation, shared by every served model. ``store``: a ModelStore (None: memory only)."""

    def __init__(self, *, clock: Clock | None = None, store=None) -> None:
        self._clock = clock or SystemClock()
        self._store = store
        self._lock = threading.Lock()
        self._book: dict[str, NodeProbation] = {}
        if store is not None:
            for nid, strikes, passed, since, reason in store.probation():
                try:
                    self._book[nid] = NodeProbation(strikes=int(strikes), passed=int(passed), since_s=float(since),
                                                    reason=str(reason))
                except ValueError:
                    log.warning("dropped a malformed probation record node=%s", str(nid)[:12])

    def of(self, node_ids: Iterable[str]) -> list[str]:
        """The nodes of ``node_ids`` on probation now."""
        with self._lock:
            return on_probation(self._book, node_ids)

    def active(self) -> dict[str, NodeProbation]:
        """Node id -> record, of the nodes on probation now."""
        with self._lock:
            return {nid: p for nid, p in self._book.items() if p.active}

    def after_check(self, *, model: str, serving: ChainResult, checker: ChainResult | None, outcome: Outcome,
                    window_done: bool) -> None:
        with self._lock:
            old = self._book
            change = after_check(old, serving=serving, checker=checker, outcome=outcome, window_done=window_done,
                                 now_s=self._clock.time())
            self._book = dict(change.book)
            changed = [(nid, p) for nid, p in self._book.items() if old.get(nid) != p]
            removed = [nid for nid in old if nid not in self._book]
        for nid in change.entered:
            p = change.book[nid]
            log.warning("probation node=%s model=%s strike=%d windows_to_pass=%d: %s", nid[:12], model, p.strikes,
                        p.required, p.reason)
        for nid in change.left:
            log.info("probation over node=%s model=%s (%s)", nid[:12], model,
                     "quarantined" if nid not in change.book else "passed its checked windows")
        if self._store is not None and (changed or removed):
            try:
                self._store.put_probation([(nid, p.strikes, p.passed, p.since_s, p.reason) for nid, p in changed],
                                          removed)
            except Exception:  # noqa: BLE001 -- the book in memory still holds; a restart forgets the change
                log.exception("could not persist probation records")
