"""Micro-batch schedules: the order in which one stage runs forward (F) and backward (B) passes.

Both schedules are deadlock-free with push-style transfers (a stage sends each output as soon as
it has it and receivers queue what arrives): every F on stage s needs only F of the same
micro-batch on s-1, every B only B of the same micro-batch on s+1.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarm.errors import InvalidRequestError

SCHEDULES = ("1f1b", "gpipe")


@dataclass(frozen=True, slots=True)
class Op:
    kind: str  # "F" or "B"
    micro_batch: int


def gpipe(num_micro_batches: int) -> list[Op]:
    """All forwards, then all backwards (most activation memory, simplest)."""
    return [Op("F", m) for m in range(num_micro_batches)] + [Op("B", m) for m in range(num_micro_batches)]


def one_f_one_b(num_micro_batches: int, stage: int, num_stages: int) -> list[Op]:
    """PipeDream-flush 1F1B: ``num_stages - stage - 1`` warm-up forwards, then alternate, then drain.

    Keeps at most ``num_stages - stage`` micro-batches' activations alive on a stage.
    """
    m = num_micro_batches
    warmup = min(num_stages - stage - 1, m)
    ops = [Op("F", i) for i in range(warmup)]
    next_f, next_b = warmup, 0
    while next_f < m:
        ops.append(Op("F", next_f))
        next_f += 1
        ops.append(Op("B", next_b))
        next_b += 1
    ops += [Op("B", i) for i in range(next_b, m)]
    return ops


def build(name: str, *, num_micro_batches: int, stage: int, num_stages: int) -> list[Op]:
    if num_micro_batches < 1 or not 0 <= stage < num_stages:
        raise InvalidRequestError(f"bad schedule shape: {num_micro_batches} micro-batches, stage {stage}/{num_stages}")
    if name == "gpipe":
        return gpipe(num_micro_batches)
    if name == "1f1b":
        return one_f_one_b(num_micro_batches, stage, num_stages)
    raise InvalidRequestError(f"schedule {name!r} unknown; use one of {SCHEDULES}")
