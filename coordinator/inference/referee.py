"""The coordinator's referee: recomputations from the checkpoint it serves (CPU, float32).

Two uses (checks.py): the second opinion when two chains disagree (with, for a decode chain of a
disaggregated model, the KV its pushed caches should hold: :meth:`Referee.kv_sketches`), and the
replay of a held check window when no other chain of the model can replay it (:class:`RefereeReplays`: per-model budget,
one worker thread, never on a gRPC or driver thread; swarm/inference/referee.py decides).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from swarm.inference.referee import (MAX_REFEREE_QUEUE, REFEREE_FLOPS_PER_S, Checker, TokenBudget, choose_checker,
                                     referee_tokens_per_s)
from swarm.inference.kv_receipt import kv_sketch
from swarm.inference.verify import ChainResult, PushedKV, Reference, allowed_tokens, sketch_rows
from swarm.model.checkpoint import load_stage

log = logging.getLogger(__name__)

MAX_REFEREE_STAGES = 8  # loaded segments the referee keeps (least recently used dropped first)
# A one-chain model is replayed on the referee only if its float32 copy fits in this fraction of the
# coordinator's memory: the referee loads the whole model, and the coordinator must not be the
# node that runs out of memory (a 7B model needs 28 GiB).
REFEREE_MEMORY_FRACTION = 0.25


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class Referee:
    """Recomputes a context from the checkpoint, segment by segment between the layer boundaries
    asked for. One recomputation at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stages: dict[tuple, torch.nn.Module] = {}

    def _stage(self, directory: Path, digest: str, first: int, last: int, *, num_layers: int):
        key = (str(directory), digest, first, last)
        stage = self._stages.pop(key, None)
        if stage is None:
            stage = load_stage(directory, first, last, is_first=first == 0, is_last=last == num_layers,
                               device="cpu", dtype=torch.float32).eval()
        self._stages[key] = stage  # most recently used last
        while len(self._stages) > MAX_REFEREE_STAGES:
            del self._stages[next(iter(self._stages))]
        return stage

    def references(self, directory: Path, digest: str, *, num_layers: int, boundaries: set[int],
                   context: tuple[int, ...], points: tuple[int, ...], params) -> dict[int, Reference]:
        """Output sketches at every boundary (and the logits at ``num_layers``) of the rows
        ``points`` of ``context``, in one prefill: row p sees ``context[:p + 1]`` only (causal)."""
        if not points or min(points) < 0 or max(points) >= len(context):
            raise ValueError(f"rows to recompute must lie in the context of {len(context)} tokens, got {points}")
        rows = list(points)
        with self._lock, torch.inference_mode():
            x = torch.tensor([list(context)], dtype=torch.long)  # (1, T)
            start, outputs = 0, {}
            for end in sorted(set(boundaries) | {num_layers}):
                x = self._stage(directory, digest, start, end, num_layers=num_layers)(x)  # (1, T, H) / (1, T, V)
                outputs[end] = sketch_rows(x[0, rows])  # (P, SKETCH_DIM)
                start = end
            return {p: Reference(outputs={b: out[i] for b, out in outputs.items()},
                                 tokens=allowed_tokens(x[0, p], params)) for i, p in enumerate(rows)}

    def kv_sketches(self, directory: Path, digest: str, *, num_layers: int, context: tuple[int, ...],
                    pushed: tuple[PushedKV, ...], layers: dict[int, tuple[int, int]]) -> dict[int, tuple[float, ...]]:
        """Per stage index of ``pushed`` (a decode chain's accepted hand-offs): the sketch
        (kv_receipt.kv_sketch, seeded by that hand-off's digest) of the KV that stage's layers
        (``layers[stage]``: first, last exclusive) hold for the first ``positions`` tokens of
        ``context``, recomputed. Hand-offs whose layers or positions do not fit are left out."""
        out: dict[int, tuple[float, ...]] = {}
        fit = [(layers[p.stage], p) for p in pushed if p.stage in layers and 0 <= layers[p.stage][0]
               < layers[p.stage][1] <= num_layers and 1 <= p.positions <= len(context)]
        by_positions: dict[int, list] = {}
        for (first, last), p in sorted(fit, key=lambda f: f[0]):
            by_positions.setdefault(p.positions, []).append((first, last, p))
        with self._lock, torch.inference_mode():
            for n, stages in by_positions.items():  # one pass over the layers per prompt length (one, usually)
                x, at = torch.tensor([list(context[:n])], dtype=torch.long), 0  # the pushed positions' tokens
                for first, last, p in stages:
                    if first < at:
                        continue  # overlapping ranges: not a chain's split
                    if first > at:
                        x = self._stage(directory, digest, at, first, num_layers=num_layers)(x)
                    stage = self._stage(directory, digest, first, last, num_layers=num_layers)
                    cache = stage.new_kv_cache(batch_size=1, max_length=n)
                    x, at = stage(x, kv_cache=cache), last
                    out[p.stage] = kv_sketch(cache.export_row(0, n), p.digest)
        return out

    def reference(self, directory: Path, digest: str, *, num_layers: int, boundaries: set[int],
                  context: tuple[int, ...], params) -> Reference:
        """Output sketches at every boundary (and the logits at ``num_layers``) of ``context``'s last row."""
        p = len(context) - 1
        return self.references(directory, digest, num_layers=num_layers, boundaries=boundaries, context=context,
                               points=(p,), params=params)[p]


def kv_reference(referee: Referee, m, chain: ChainResult, context: tuple[int, ...]) -> dict[int, tuple[float, ...]]:
    """For a chain whose caches of a session began with pushed KV (``chain.pushed_kv``), served as
    model ``m``: the referee's sketch of what each pushed stage's cache should hold (verify.py
    ``judge`` weighs the hand-off with it); {} for other chains, or when it cannot be recomputed."""
    if not chain.cache_pushed or not chain.pushed_kv:
        return {}
    layers = {k: (st.first_layer, st.last_layer_excl) for k, st in enumerate(chain.stages)}
    try:
        return referee.kv_sketches(m.record.dir, m.record.digest, num_layers=m.config.num_layers, context=context,
                                   pushed=chain.pushed_kv, layers=layers)
    except Exception:  # noqa: BLE001 -- then the hand-off cannot be weighed: nobody is blamed for it
        log.exception("the referee could not recompute a pushed KV cache model=%s", m.record.name)
        return {}


class RefereeReplays:
    """Check windows replayed on the referee: per-model budgets of replay tokens per second
    (``tokens_per_s`` for every model, or by default from the model's size and
    REFEREE_FLOPS_PER_S), at most MAX_REFEREE_QUEUE waiting, run one at a time on a worker thread.

    Protocol: :meth:`submit` is called on a driver thread with the replay's cost; it decides
    (``choose_checker``) and either queues ``job`` (which runs on the worker and reports its own
    result) and returns True, or returns False at once (void)."""

    def __init__(self, referee: Referee, clock, *, tokens_per_s: float | None = None,
                 flops_per_s: float = REFEREE_FLOPS_PER_S, max_queue: int = MAX_REFEREE_QUEUE,
                 executor=None, memory_bytes: int | None = None) -> None:
        """``executor``: runs the replays (default: one worker thread of its own); ``memory_bytes``:
        this machine's memory (default: measured), which bounds the models the referee loads."""
        self.referee = referee
        self._clock = clock
        self._tokens_per_s = tokens_per_s
        self._flops_per_s = flops_per_s
        self._max_queue = max_queue
        self._lock = threading.Lock()
        self._budgets: dict[str, TokenBudget] = {}
        self._queued = 0
        self._memory_bytes = memory_bytes if memory_bytes is not None else _physical_memory_bytes()
        self._too_big: set[str] = set()  # models already logged as too large for the referee
        self._own_pool = executor is None
        self._pool = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="referee")

    def rate(self, m) -> float:
        """Replay tokens per second model ``m`` (an engine's ServedModel) may spend on the referee."""
        if self._tokens_per_s is not None:
            return self._tokens_per_s
        config = getattr(m, "config", None)
        if config is None:
            return 0.0
        need = 4 * config.num_parameters(include_embeddings=True)  # the whole model in float32
        if need > REFEREE_MEMORY_FRACTION * self._memory_bytes:
            if m.record.name not in self._too_big:
                self._too_big.add(m.record.name)
                log.warning("model %s needs %.1f GiB in float32, more than %.0f%% of this coordinator's %.1f GiB: "
                            "its one-chain check windows stay void (serve it with --replicas 2 or more to check it "
                            "on another chain)", m.record.name, need / 2**30, 100 * REFEREE_MEMORY_FRACTION,
                            self._memory_bytes / 2**30)
            return 0.0
        return referee_tokens_per_s(max(1, config.num_parameters(include_embeddings=False)), self._flops_per_s)

    def enabled(self, m) -> bool:
        """Whether model ``m``'s windows may be replayed on the referee at all (a budget above 0)."""
        return self.rate(m) > 0

    def _budget(self, m) -> TokenBudget:
        key = f"{m.record.name}@{m.record.digest}"
        b = self._budgets.get(key)
        if b is None:
            b = self._budgets[key] = TokenBudget(tokens_per_s=self.rate(m))
        return b

    def submit(self, m, cost_tokens: int, job: Callable[[], None]) -> bool:
        """Queue ``job`` (a replay of ``cost_tokens``) for model ``m`` if the budget and the backlog
        allow it; False when they do not (the window is void)."""
        now = self._clock.monotonic()
        with self._lock:
            enabled = self.enabled(m)
            budget = self._budget(m) if enabled else None
            choice = choose_checker(chain_has_room=False, referee_enabled=enabled,
                                    budget_admits=budget is not None and budget.admits(now),
                                    referee_queued=self._queued, max_queue=self._max_queue)
            if choice is not Checker.REFEREE:
                return False
            budget.take(cost_tokens, now)
            self._queued += 1

        def run() -> None:
            try:
                job()
            finally:
                with self._lock:
                    self._queued -= 1

        try:
            self._pool.submit(run)
        except RuntimeError:  # shut down meanwhile
            with self._lock:
                self._queued -= 1
            return False
        return True

    def close(self) -> None:
        if self._own_pool:
            self._pool.shutdown(wait=False, cancel_futures=True)
