"""A stage's commitments to the rows of a spot check's replay (``commit_points``).

Protocol: the coordinator replays a session's context on another chain to check several of its
sampled steps at once (coordinator/inference/checks.py); the replay entry names the positions
(0-based, in the session) of the sampled steps' last rows. Every stage returns, for each such
row, a ``ServeCommitment`` with ``position`` = 1 + the row's position: sketches
(swarm/inference/verify.py) of the hidden state it received at that row and of what it output
there (the logits on the last stage, which also sets ``token``: what its sampling picks from
that row, as it would have when that row was the entry's last). Points the request names for
rows the entry does not carry, or for sessions not in the step, are ignored (validated here,
before anything runs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from swarm.inference.stage_runtime import StepEntry
from swarm.inference.verify import sketch_rows
from swarm.proto.v1 import inference_pb2 as pb

MAX_POINTS_PER_ENTRY = 256  # sampled steps one replay checks; a session longer is checked in several


def commit_points(points_pb, entries: list[StepEntry]) -> dict[int, list[int]]:
    """{entry index: row offsets within the entry} for the points of the request, validated:
    only rows the entry carries, each once, ascending, at most MAX_POINTS_PER_ENTRY."""
    index = {e.session_id: i for i, e in enumerate(entries)}
    out: dict[int, list[int]] = {}
    for cp in points_pb[: len(entries)]:
        i = index.get(cp.session_id)
        if i is None or i in out:
            continue
        e = entries[i]
        rows = sorted({p - e.start_position for p in cp.positions[:MAX_POINTS_PER_ENTRY]
                       if e.start_position <= p < e.start_position + e.num_tokens})
        if rows:
            out[i] = rows
    return out


def point_commitments(stage: int, entries: list[StepEntry], points: dict[int, list[int]],
                      hidden: torch.Tensor | None, out, *, last: bool,
                      sample: Callable[[list[StepEntry], torch.Tensor], list[int]] | None = None
                      ) -> list[pb.ServeCommitment]:
    """This stage's commitments at ``points``. ``hidden``: the packed input (sum num_tokens, H)
    or None on the first stage; ``out``: the packed output on inner stages, or on the last stage
    {entry index: logits (k, V) of its points} (StageRuntime.run_keeping) with ``sample``."""
    if not points:
        return []
    offsets, off = [], 0
    for e in entries:
        offsets.append(off)
        off += e.num_tokens
    result = []
    for i, rows in sorted(points.items()):
        e = entries[i]
        packed = [offsets[i] + r for r in rows]
        ins = sketch_rows(hidden[packed]) if hidden is not None else [()] * len(rows)
        tokens = [0] * len(rows)
        if last:
            logits = out.get(i)
            if logits is None:
                continue
            outs = sketch_rows(logits)
            # each row sampled as if it were the entry's last: the token of position p + 1
            tokens = sample([StepEntry(session_id=e.session_id, start_position=e.start_position + r, num_tokens=1,
                                       sampling=e.sampling) for r in rows], logits)
        else:
            outs = sketch_rows(out[packed])
        for r, inp, o, tok in zip(rows, ins, outs, tokens):
            result.append(pb.ServeCommitment(stage=stage, session_id=e.session_id, input=inp, output=o,
                                             position=e.start_position + r + 1, token=tok))
    return result
