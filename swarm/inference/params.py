"""How to pick tokens (:class:`SamplingParams`), without torch: the CLI and the client import it
and start fast; :mod:`swarm.inference.sampling` does the picking."""

from __future__ import annotations

import math
from dataclasses import dataclass

from swarm.errors import InvalidRequestError

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy (top_k/top_p then do not matter)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int = 0
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise InvalidRequestError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise InvalidRequestError(
                f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters"
            )
        if not 0 <= self.seed < (1 << 63):
            raise InvalidRequestError("seed must be in [0, 2^63)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
