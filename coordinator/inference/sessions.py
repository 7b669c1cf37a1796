"""What a served model's driver works with: a chain's stage (:class:`StageRef`) and a generation
request as the engine tracks it (:class:`Session`: its sampling state, the position the current
chain's caches hold, the tokens generated but not yet released while spot checks run on them,
and where it goes next). The driver that steps sessions is coordinator/inference/replica.py.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from swarm.errors import SwarmError
from swarm.inference.session import GenerationState
from swarm.inference.stage_runtime import StepEntry

if TYPE_CHECKING:
    from coordinator.inference.replica import Replica


@dataclass(frozen=True, slots=True, kw_only=True)
class StageRef:
    node_id: str
    address: str
    first_layer: int
    last_layer_excl: int


class Session:
    """A generation request as the engine tracks it. ``sink`` receives TokenEvents, then None at
    the end, or an exception (a SwarmError) if it failed."""

    def __init__(self, *, session_id: str, model: str, state: GenerationState, sink: Callable[[object], None]) -> None:
        self.id = session_id
        self.model = model
        self.state = state
        self.sink = sink
        self.kv_pos = 0  # tokens the current replica's caches hold for this session
        self.replay_stages = 0  # > 0: only stages 0..replay_stages-1 need the prefix again (routes.py)
        self.replica: Replica | None = None
        # disaggregated serving (disagg.py): called as handoff(replica, session) once a step
        # prefilled the session, after it was detached from the replica (its KV moves elsewhere)
        self.handoff: Callable[["Replica", "Session"], None] | None = None
        self.num_replays = 0
        self.cancelled = False
        self.closed = False
        self.waiting_since_s = 0.0
        # generated, not yet given to the client: [token, check ticket or None, check passed]; the
        # front is released once it has no ticket or its check passed (Replica._flush)
        self.pending: list[list] = []
        # the check window the session is in (checks.py window_step): where it ends (a row
        # position; None: none started) and whether its steps are checked (drawn at its start)
        self.window_end: int | None = None
        self.window_checked = False
        self.history_checked = True  # every step on the current chain since its reset was sampled for a check
        # disaggregated serving: the current chain's caches start from KV another chain pushed
        # (disagg.py); a stage's wrong output is then not its own for sure (verify.py ``cache_pushed``)
        self.kv_pushed = False
        # the accepted hand-offs of those pushed caches, one per stage (swarm/inference/kv_receipt.py)
        self.kv_receipts: tuple = ()
        self.handed_off_from: "Replica | None" = None  # the prefill chain it left: its held checks conclude after
        self.check_slots: deque = deque()  # checks in step order, concluded in that order (Checks)
        self.check_batch: list = []  # held sampled steps whose replay is not sent yet (Checks.begin)
        self.check_lock = threading.Lock()

    def fail(self, exc: SwarmError) -> None:
        if not self.closed:
            self.closed = True
            self.sink(exc)

    def ids(self) -> list[int]:
        """Prompt, released and pending tokens: what the current chain has computed on."""
        return self.state.all_ids + [p[0] for p in self.pending]

    def runnable(self) -> bool:
        """Whether a next token may be generated: not finished, and the pending tokens neither
        reach max_new_tokens nor end with eos (a stop string is known only at release)."""
        st = self.state
        if st.done or self.closed:
            return False
        if not self.pending:
            return True
        return (len(st.generated) + len(self.pending) < st.params.max_new_tokens
                and self.pending[-1][0] != st.eos_token_id)

    def entry(self) -> StepEntry:
        ids = self.ids()
        if self.kv_pos == 0 or self.replay_stages:
            return StepEntry(session_id=self.id, start_position=0, num_tokens=len(ids), token_ids=tuple(ids),
                             reset=True, sampling=self.state.params,
                             replay_stages=self.replay_stages if self.kv_pos else 0)
        assert self.kv_pos == len(ids) - 1, (self.kv_pos, len(ids))
        return StepEntry(session_id=self.id, start_position=self.kv_pos, num_tokens=1, token_ids=(ids[-1],),
                         sampling=self.state.params)
