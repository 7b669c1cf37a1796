"""One stage's side of serving: per-session KV caches, batched steps, idle timeouts. No network.

A step is a list of :class:`StepEntry` (one per session) plus, on every stage but the first,
the entries' hidden states packed along the token axis: (sum of num_tokens, hidden). Prefill
entries (several tokens, or a session the stage has not seen) run one by one; decode entries
(one token of a known session) run together as one batch over a shared :class:`KVCache` whose
rows are those sessions. Two ways to keep those rows:

- on a GPU (and wherever ``slots=True``), every session holds a row of one cache of fixed rows
  (swarm/inference/slots.py) from its first step to its close, and a decode step runs over a
  power-of-two bucket of those rows, replayed as a CUDA graph (swarm/inference/graphs.py): the
  shapes never change, whichever sessions take part;
- on a CPU, where idle rows would cost real arithmetic, batch caches per set of decoding
  sessions are kept between steps (a few at once, least recently used dropped first) and
  rebuilt only when a group's set of sessions changes, so steady-state decoding copies no cache.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from swarm.clock import Clock, SystemClock
from swarm.errors import CapacityError, InvalidRequestError, NotFoundError
from swarm.inference.batch_groups import BatchGroups
from swarm.inference.cache_pool import CachePool
from swarm.inference.graphs import graphs_enabled, no_cudnn_attention
from swarm.inference.sampling import SamplingParams, sample_batch
from swarm.inference.slots import SlotCache, slots_wanted
from swarm.model.kv_cache import KVCache
from swarm.model.stage import StageModel

log = logging.getLogger(__name__)

MAX_SESSION_ID_CHARS = 128


@dataclass(frozen=True, slots=True, kw_only=True)
class StepEntry:
    """One session's part of a step. ``token_ids`` only on the first stage."""

    session_id: str
    start_position: int
    num_tokens: int
    token_ids: tuple[int, ...] = ()
    reset: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # > 0 on a reset prefill that re-routes one stage: only the first replay_stages stages need
    # the prefix; the stage replay_stages - 1 sends on the last position alone (node servicer)
    replay_stages: int = 0

    def __post_init__(self) -> None:
        if not self.session_id or len(self.session_id) > MAX_SESSION_ID_CHARS:
            raise InvalidRequestError(f"session_id must be 1..{MAX_SESSION_ID_CHARS} characters")
        if self.start_position < 0 or self.num_tokens < 1:
            raise InvalidRequestError(
                f"session {self.session_id}: start_position must be >= 0 and num_tokens >= 1"
            )
        if self.replay_stages < 0 or (self.replay_stages and not self.reset):
            raise InvalidRequestError(f"session {self.session_id}: replay_stages must be >= 0, and only on a reset entry")
        if self.token_ids and len(self.token_ids) != self.num_tokens:
            raise InvalidRequestError(
                f"session {self.session_id}: {len(self.token_ids)} token ids for num_tokens={self.num_tokens}"
            )


StageEntryList = list  # list[StepEntry]


@dataclass(slots=True)
class _Session:
    cache: KVCache | None  # None while the session is a row of a batch cache or of the slot cache
    length: int
    last_used_s: float
    slot: int = -1  # its row of the slot cache (slot mode)


class StageRuntime:
    """Runs a :class:`StageModel` for many sessions. Thread-safe (one step at a time).

    Sessions are created by their first entry (which must start at position 0), closed by
    :meth:`close` or after ``session_timeout_s`` without a step. At most ``max_sessions`` live
    at once (each holds a KV cache of ``max_seq_len`` positions).
    """

    def __init__(
        self,
        stage: StageModel,
        *,
        max_seq_len: int,
        max_sessions: int,
        session_timeout_s: float = 300.0,
        clock: Clock | None = None,
        slots: bool | None = None,
    ) -> None:
        """``slots``: keep sessions in a slot cache (swarm/inference/slots.py); default:
        :func:`swarm.inference.slots.slots_wanted` (CUDA, or as ``SWARM_SLOT_CACHE`` says)."""
        if max_seq_len < 1 or max_sessions < 1 or session_timeout_s <= 0:
            raise InvalidRequestError("max_seq_len, max_sessions and session_timeout_s must be positive")
        self.stage = stage.eval()
        self.max_seq_len = min(max_seq_len, stage.config.max_position_embeddings)
        self.max_sessions = max_sessions
        self.session_timeout_s = session_timeout_s
        self._clock = clock or SystemClock()
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        p = next(stage.parameters())
        self.device, self.dtype = p.device, p.dtype
        no_cudnn_attention(self.device)
        if slots is None:
            slots = slots_wanted(self.device)
        # GPU: the slot cache and its decode steps, as CUDA graphs (swarm/inference/slots.py, graphs.py;
        # SWARM_CUDA_GRAPHS=0: off)
        self._slots = SlotCache(self.stage, max_rows=max_sessions, max_seq_len=self.max_seq_len,
                                graphs=graphs_enabled(self.device)) if slots else None
        # emptied caches kept for the next sessions (swarm/inference/cache_pool.py)
        self._pool = CachePool(lambda b: self.stage.new_kv_cache(batch_size=b, max_length=self.max_seq_len),
                               max_rows=max_sessions)
        # CPU: batch caches per set of decoding sessions (swarm/inference/batch_groups.py)
        self._groups = BatchGroups(self._sessions, self._pool, self._give)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def graph_stats(self) -> dict:
        """CUDA-graph decode (swarm/inference/graphs.py): on, graphs captured, steps replayed."""
        g = self._slots.graphs if self._slots is not None else None
        return {"graphs_on": bool(g is not None and g.enabled), "graph_captures": g.captures if g else 0,
                "graph_replays": g.replays if g else 0}

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def session_length(self, session_id: str) -> int | None:
        s = self._sessions.get(session_id)
        return None if s is None else s.length

    def kv_cache_bytes(self) -> int:
        with self._lock:
            total = sum(s.cache.nbytes() for s in self._sessions.values() if s.cache is not None)
            slots = self._slots.nbytes() if self._slots is not None else 0
            return total + slots + self._pool.nbytes() + self._groups.nbytes()

    def _give(self, cache: KVCache) -> None:
        self._pool.give(cache, open_sessions=len(self._sessions))

    def close(self, session_ids: list[str]) -> int:
        """Free the caches of these sessions; unknown ids are ignored. Returns how many closed."""
        with self._lock:
            return self._close_locked(session_ids)

    def _close_locked(self, session_ids: list[str]) -> int:
        # once each: the same id twice (a session both finished and cancelled, or a client's
        # repeat) raised KeyError at its second pop, an internal error of CloseSession
        closed = [sid for sid in dict.fromkeys(session_ids) if sid in self._sessions]
        if not closed:
            return 0
        freed = self._groups.closing(set(closed))
        for sid in closed:
            s = self._sessions.pop(sid)
            if s.cache is not None:
                freed.append(s.cache)
            if s.slot >= 0:
                self._slots.give(s.slot)
        for cache in freed:
            self._give(cache)
        return len(closed)

    def expire(self) -> list[str]:
        """Close sessions idle for longer than the timeout; returns their ids."""
        with self._lock:
            now = self._clock.monotonic()
            old = [sid for sid, s in self._sessions.items() if now - s.last_used_s > self.session_timeout_s]
            self._close_locked(old)
            if old and not self._sessions:  # an idle stage gives its memory back, spare caches too
                self._pool.clear()
                if self._slots is not None:
                    self._slots.clear()
        if old:
            log.info("expired idle sessions count=%d", len(old))
        return old

    # ------------------------------------------------------------------ KV hand-off
    def export_kv(self, session_id: str) -> tuple[torch.Tensor, int]:
        """A copy of a session's cache: (layers, 2, kv_heads, length, head_dim) (K then V) and its
        length (disaggregated serving moves it to a decode stage). Raises NotFoundError."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                raise NotFoundError(f"session {session_id[:40]} is not on this stage (closed or expired); replay it")
            if s.slot >= 0:
                return self._slots.cache.export_row(s.slot, s.length), s.length
            if s.cache is None:  # a row of a batch cache: give it back its own first
                self._groups.release(session_id)
            c, n = s.cache, s.length
            assert c is not None
            return c.export_row(0, n), n

    def kv_shape(self, length: int) -> tuple[int, ...]:
        """The shape :meth:`import_kv` accepts for a session of ``length`` positions."""
        cfg = self.stage.config
        return (len(self.stage.layers), 2, cfg.num_kv_heads, length, cfg.head_dim)

    def import_kv(self, session_id: str, kv: torch.Tensor) -> None:
        """Open (or replace) a session holding ``kv`` (:meth:`export_kv`'s layout, any float
        dtype): its next step starts at position ``kv.shape[3]``. Raises InvalidRequestError for
        a wrong shape or a length without room for one more token, CapacityError when full."""
        if kv.dim() != 5 or tuple(kv.shape) != self.kv_shape(int(kv.shape[3])):
            raise InvalidRequestError(f"KV cache of shape {tuple(kv.shape)} does not fit this stage: "
                                      f"expected {self.kv_shape(0)[:3]} x length x {self.kv_shape(0)[4]}")
        n = int(kv.shape[3])
        if not 1 <= n < self.max_seq_len:
            raise InvalidRequestError(f"KV cache of {n} positions: this stage serves 1..{self.max_seq_len - 1}")
        kv = kv.to(device=self.device, dtype=self.dtype)
        with self._lock, torch.inference_mode():
            self._close_locked([session_id])
            if len(self._sessions) >= self.max_sessions:
                raise CapacityError(f"stage holds its maximum of {self.max_sessions} sessions; retry later")
            slot = self._slots.take() if self._slots is not None else -1
            cache = self._slots.row(slot) if slot >= 0 else self._pool.take(1)
            for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
                k[0, :, :n] = kv[i, 0]
                v[0, :, :n] = kv[i, 1]
            cache.lengths[:] = n
            self._sessions[session_id] = _Session(cache=None if slot >= 0 else cache, length=n,
                                                  last_used_s=self._clock.monotonic(), slot=slot)

    # ------------------------------------------------------------------ the step
    def _prepare(self, entry: StepEntry) -> None:
        s = self._sessions.get(entry.session_id)
        if entry.reset and s is not None:
            self._close_locked([entry.session_id])
            s = None
        if s is None:
            if entry.start_position != 0:
                raise InvalidRequestError(
                    f"session {entry.session_id} is unknown on this stage (expired or never opened); "
                    "replay it from position 0"
                )
            if len(self._sessions) >= self.max_sessions:
                raise CapacityError(
                    f"stage holds its maximum of {self.max_sessions} sessions; retry later or add a replica"
                )
            now = self._clock.monotonic()
            if self._slots is not None:
                self._sessions[entry.session_id] = _Session(cache=None, length=0, last_used_s=now, slot=self._slots.take())
            else:
                self._sessions[entry.session_id] = _Session(cache=self._pool.take(1), length=0, last_used_s=now)
        elif entry.start_position != s.length:
            raise InvalidRequestError(
                f"session {entry.session_id} is at position {s.length} on this stage, the step starts at "
                f"{entry.start_position}; replay the session"
            )
        if entry.start_position + entry.num_tokens > self.max_seq_len:
            raise InvalidRequestError(
                f"session {entry.session_id} would reach {entry.start_position + entry.num_tokens} tokens, "
                f"past the served context of {self.max_seq_len}; shorten the prompt or max_new_tokens"
            )

    def run(self, entries: list[StepEntry], hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step. Returns packed hidden (sum num_tokens, H) on inner stages and the logits
        of each entry's last position (num_entries, vocab) on the last stage.

        Raises InvalidRequestError for inconsistent entries (nothing is changed then) and
        CapacityError when too many sessions are open.
        """
        return self.run_keeping(entries, hidden)[0]

    def run_keeping(self, entries: list[StepEntry], hidden: torch.Tensor | None = None,
                    keep: dict[int, list[int]] | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """:meth:`run`, also returning, on the last stage, the logits (k, vocab) of the rows
        ``keep[i]`` (offsets within entry i) of entries that prefill (a spot check's replay commits
        to several positions). Inner stages return every row anyway: the dict is empty there."""
        keep = keep if keep and self.stage.is_last else {}
        kept: dict[int, torch.Tensor] = {}
        if not entries:
            raise InvalidRequestError("a step needs at least one session entry")
        if len({e.session_id for e in entries}) != len(entries):
            raise InvalidRequestError("a step names a session twice")
        total = sum(e.num_tokens for e in entries)
        if self.stage.is_first:
            if any(len(e.token_ids) != e.num_tokens for e in entries):
                raise InvalidRequestError("the first stage needs token_ids for every entry")
            vocab = self.stage.config.vocab_size
            if any(not 0 <= t < vocab for e in entries for t in e.token_ids):
                raise InvalidRequestError(f"token ids must be in [0, {vocab})")
        else:
            H = self.stage.config.hidden_size
            if hidden is None or tuple(hidden.shape) != (total, H):
                got = None if hidden is None else tuple(hidden.shape)
                raise InvalidRequestError(f"hidden states must have shape ({total}, {H}), got {got}")
            hidden = hidden.to(device=self.device, dtype=self.dtype)
        with self._lock, torch.inference_mode():
            now = self._clock.monotonic()
            # validate everything before touching any cache
            for e in entries:
                known = self._sessions.get(e.session_id)
                if known is not None and not e.reset and e.start_position != known.length:
                    raise InvalidRequestError(
                        f"session {e.session_id} is at position {known.length} on this stage, the step starts "
                        f"at {e.start_position}; replay the session"
                    )
            for e in entries:
                self._prepare(e)
            offsets, off = [], 0
            for e in entries:
                offsets.append(off)
                off += e.num_tokens
            decode = [i for i, e in enumerate(entries) if e.num_tokens == 1 and self._sessions[e.session_id].length > 0]
            prefill = [i for i in range(len(entries)) if i not in set(decode)]
            outs: list[torch.Tensor | None] = [None] * len(entries)
            # new sessions with prompts of equal length prefill together, as one batch
            fresh: dict[int, list[int]] = {}
            for i in prefill:
                if self._sessions[entries[i].session_id].length == 0:
                    fresh.setdefault(entries[i].num_tokens, []).append(i)
            batched = {i for rows in fresh.values() if len(rows) > 1 for i in rows}
            for rows in fresh.values():
                if len(rows) > 1:
                    self._prefill_together(rows, entries, hidden, offsets, outs, now, keep, kept)
            for i in prefill:
                if i in batched:
                    continue
                e = entries[i]
                s = self._sessions[e.session_id]
                if s.slot < 0 and s.cache is None:  # a row of a batch cache that is re-prefilled: give it back its cache
                    self._groups.release(e.session_id)
                x = self._input(e, hidden, offsets[i])  # (1, T) or (1, T, H)
                y = self.stage(x, kv_cache=s.cache if s.slot < 0 else self._slots.row(s.slot))
                outs[i] = y[0, -1:] if self.stage.is_last else y[0]
                if i in keep:
                    kept[i] = y[0, keep[i]]
                s.length += e.num_tokens
                s.last_used_s = now
            if decode:
                es, at = [entries[i] for i in decode], [offsets[i] for i in decode]
                if self._slots is not None:
                    y = self._slots.decode([self._sessions[e.session_id].slot for e in es],
                                           [e.token_ids[0] for e in es] if self.stage.is_first else None, hidden, at)
                else:
                    y = self._decode_group(es, at, hidden)
                for row, i in enumerate(decode):  # (B, 1, H|V), in the entries' order
                    outs[i] = y[row]
                    if i in keep:
                        kept[i] = y[row, [0] * len(keep[i])]
                    s = self._sessions[entries[i].session_id]
                    s.length += 1
                    s.last_used_s = now
            return torch.cat(outs, dim=0), kept

    def _decode_group(self, es: list[StepEntry], offsets: list[int], hidden: torch.Tensor | None) -> torch.Tensor:
        """One decode step of the sessions of ``es`` over their batch cache (the CPU path)."""
        group = self._groups.ensure([e.session_id for e in es])
        if self.stage.is_first:
            x = torch.tensor([[e.token_ids[0]] for e in es], dtype=torch.long, device=self.device)
        else:
            x = torch.stack([hidden[o] for o in offsets])[:, None, :]  # (B, 1, H)
        return self.stage(x, kv_cache=group)

    def _prefill_together(self, rows: list[int], entries: list[StepEntry], hidden: torch.Tensor | None,
                          offsets: list[int], outs: list, now: float, keep: dict[int, list[int]],
                          kept: dict[int, torch.Tensor]) -> None:
        """Prefill new sessions of equal prompt length as one batch of ``len(rows)`` rows. Their
        batch cache becomes their decode group, so a next step that decodes exactly these
        sessions in this order copies no cache."""
        ids = [entries[i].session_id for i in rows]
        T = entries[rows[0]].num_tokens
        for sid in ids:  # their own (empty) caches from _prepare: the batch cache replaces them
            s = self._sessions[sid]
            if s.cache is not None:
                self._give(s.cache)
                s.cache = None
        cache = self._pool.take(len(rows))  # slot mode: a scratch batch, whose rows go to the slots
        if self.stage.is_first:
            x = torch.tensor([list(entries[i].token_ids) for i in rows], dtype=torch.long, device=self.device)  # (B, T)
        else:
            assert hidden is not None
            x = torch.stack([hidden[offsets[i] : offsets[i] + T] for i in rows])  # (B, T, H)
        y = self.stage(x, kv_cache=cache)
        for row, i in enumerate(rows):
            outs[i] = y[row, -1:] if self.stage.is_last else y[row]
            if i in keep:
                kept[i] = y[row, keep[i]]
        if self._slots is not None:
            for row, sid in enumerate(ids):
                s = self._sessions[sid]
                self._slots.put(s.slot, cache, row, T)
                s.length += T
                s.last_used_s = now
            self._give(cache)
            return
        for sid in ids:
            s = self._sessions[sid]
            s.length += T
            s.last_used_s = now
        self._groups.adopt(ids, cache)

    def _input(self, e: StepEntry, hidden: torch.Tensor | None, offset: int) -> torch.Tensor:
        if self.stage.is_first:
            return torch.tensor([list(e.token_ids)], dtype=torch.long, device=self.device)
        assert hidden is not None
        return hidden[offset : offset + e.num_tokens][None]

    def run_and_sample(self, entries: list[StepEntry], hidden: torch.Tensor | None = None) -> list[int]:
        """Last stage: run the step and pick one token per entry with its sampling params."""
        if not self.stage.is_last:
            raise InvalidRequestError("only the last stage samples tokens")
        return self.sample(entries, self.run(entries, hidden))

    def sample(self, entries: list[StepEntry], logits: torch.Tensor) -> list[int]:
        """One token per entry from the last stage's ``logits`` (num_entries, vocab)."""
        positions = [e.start_position + e.num_tokens for e in entries]
        return sample_batch(logits.float().cpu(), [e.sampling for e in entries], positions)
