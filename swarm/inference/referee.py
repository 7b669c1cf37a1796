"""Checks on the referee (issue 13): the budget that bounds them and where a replay runs.

A check window's replay (coordinator/inference/checks.py) runs on another ready chain of the
model when one has room; otherwise on the coordinator's referee (a CPU float32 recomputation from
the checkpoint it serves), within a per-model budget of replay tokens per second; otherwise it is
void (its tokens are released unchecked, and the window is counted).

Pure: the caller passes the time (an injected clock) and the model's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

# FLOP/s of the coordinator's CPU one model's referee replays may take on average. A 2-core
# loaded dev box measured ~200 GFLOP/s in a float32 prefill of 256 tokens through a 19M-parameter
# llama (2 threads); a tenth of it leaves the coordinator's own work (gRPC, drivers, planner)
# untouched. It buys ~1.4 replay tokens/s for a 7B model, which at the default --verify-prob 0.05
# (about 2p = 0.1 replay tokens per generated token, checks.py) checks ~14 generated tokens/s:
# one volunteer chain's decode rate.
REFEREE_FLOPS_PER_S = 20e9
# Seconds of budget a model may save up: a burst of windows after a quiet spell is checked, a
# steady overload is not.
REFEREE_BURST_S = 30.0
# Replays waiting for the referee, all models together: past it a window is void. The budget bounds
# the average; this bounds the backlog when the coordinator's CPU is slower than the budget assumed.
MAX_REFEREE_QUEUE = 4


def referee_tokens_per_s(num_parameters: int, flops_per_s: float = REFEREE_FLOPS_PER_S) -> float:
    """Replay tokens per second the referee may spend on a model of ``num_parameters`` (without
    embeddings: ~2 FLOP per parameter per token)."""
    if num_parameters < 1:
        raise ValueError(f"a model has at least one parameter, got {num_parameters}")
    if not (math.isfinite(flops_per_s) and flops_per_s >= 0):
        raise ValueError(f"the referee's FLOP/s budget must be finite and >= 0, got {flops_per_s}")
    return flops_per_s / (2.0 * num_parameters)


@dataclass(slots=True, kw_only=True)
class TokenBudget:
    """A token bucket of replay tokens: ``tokens_per_s`` refill, at most ``burst_s`` seconds of it
    saved. A replay is admitted while the level is positive and takes its whole cost, even into
    debt: a window longer than the bucket is still checked, and the debt delays the next ones, so
    over any span T the tokens admitted stay below tokens_per_s x (T + burst_s) + one replay."""

    tokens_per_s: float
    burst_s: float = REFEREE_BURST_S
    level: float = math.nan  # full at the first use
    updated_s: float = math.nan

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tokens_per_s) and self.tokens_per_s >= 0):
            raise ValueError(f"a referee budget is a finite rate >= 0 tokens/s, got {self.tokens_per_s}")
        if not (math.isfinite(self.burst_s) and self.burst_s > 0):
            raise ValueError(f"a referee budget saves up a positive number of seconds, got {self.burst_s}")

    @property
    def capacity(self) -> float:
        return self.tokens_per_s * self.burst_s

    def _refill(self, now_s: float) -> None:
        if math.isnan(self.level):
            self.level, self.updated_s = self.capacity, now_s
            return
        elapsed = max(0.0, now_s - self.updated_s)  # a clock stepping back refills nothing
        self.level = min(self.capacity, self.level + elapsed * self.tokens_per_s)
        self.updated_s = max(self.updated_s, now_s)

    def admits(self, now_s: float) -> bool:
        """Whether a replay would be admitted now (the level is positive)."""
        self._refill(now_s)
        return self.tokens_per_s > 0 and self.level > 0

    def take(self, cost_tokens: int, now_s: float) -> bool:
        """Admit a replay of ``cost_tokens`` (the context it prefills) and charge it; False (and
        nothing charged) when over budget."""
        if cost_tokens < 1:
            raise ValueError(f"a replay prefills at least one token, got {cost_tokens}")
        if not self.admits(now_s):
            return False
        self.level -= cost_tokens
        return True


class Checker(Enum):
    CHAIN = "chain"  # another ready chain of the model, with room, replays the window
    REFEREE = "referee"  # the coordinator recomputes it
    VOID = "void"  # nobody: released unchecked, counted


def choose_checker(*, chain_has_room: bool, referee_enabled: bool, budget_admits: bool, referee_queued: int,
                   max_queue: int = MAX_REFEREE_QUEUE) -> Checker:
    """Where a held window's replay runs.

    Another chain with room first: its replay is a prefill riding in its next batch, on hardware
    built for it, answered within a step. Else the referee, when enabled, within budget, and its
    backlog below ``max_queue``. A chain that is ready but full is not waited for: it frees a slot
    only when one of its sessions ends (seconds to minutes), all the while the client's tokens are
    held; the referee, within its budget, answers a window in about the time of a prefill on the
    coordinator's CPU, so it is the cheaper wait whenever it is allowed. Over budget the window is
    void rather than waiting, for the same reason."""
    if referee_queued < 0 or max_queue < 0:
        raise ValueError(f"queue lengths are >= 0, got {referee_queued} queued, {max_queue} max")
    if chain_has_room:
        return Checker.CHAIN
    if referee_enabled and budget_admits and referee_queued < max_queue:
        return Checker.REFEREE
    return Checker.VOID
