"""Single-process generation with the same code path as a served stage (the reference).

:func:`generate_local` runs a whole model as one :class:`StageRuntime` (first and last stage)
and samples exactly as the last stage of a pipeline does, so a pipeline's tokens must equal
these. :class:`LocalChain` strings several in-process stages together for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from swarm.inference.sampling import SamplingParams
from swarm.inference.stage_runtime import StageEntryList, StageRuntime, StepEntry


class LocalChain:
    """Stages of one model run in order in this process, passing hidden states directly."""

    def __init__(self, stages: list[StageRuntime]) -> None:
        if not stages or not stages[0].stage.is_first or not stages[-1].stage.is_last:
            raise ValueError("a chain runs from a first stage to a last stage")
        self.stages = stages

    def step(self, entries: StageEntryList) -> list[int]:
        hidden: torch.Tensor | None = None
        for st in self.stages[:-1]:
            hidden = st.run(entries, hidden)
        return self.stages[-1].run_and_sample(entries, hidden)

    def close(self, session_ids: list[str]) -> None:
        for st in self.stages:
            st.close(session_ids)


def generate_local(
    step: Callable[[StageEntryList], list[int]],
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    eos_token_id: int | None = None,
    session_id: str = "local",
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Prefill ``prompt_ids`` then decode until max_new_tokens or eos; returns generated ids.

    ``step`` is a chain's step function (``LocalChain.step`` or one stage's ``run_and_sample``).
    """
    out: list[int] = []
    entry = StepEntry(
        session_id=session_id, start_position=0, num_tokens=len(prompt_ids), token_ids=tuple(prompt_ids), sampling=params
    )
    pos = len(prompt_ids)
    while True:
        (tok,) = step([entry])
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if len(out) >= params.max_new_tokens or (eos_token_id is not None and tok == eos_token_id):
            return out
        entry = StepEntry(session_id=session_id, start_position=pos, num_tokens=1, token_ids=(tok,), sampling=params)
        pos += 1
