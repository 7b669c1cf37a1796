"""Inference spot checks, the pure part (swarm/inference/verify.py): sketches, agreement of two
chains, the second opinion's judgement and the resulting decision. No network, no sleeps."""

from __future__ import annotations

import math

import pytest
import torch

from swarm.inference.params import SamplingParams
from swarm.inference.verify import (SKETCH_DIM, TOLERANCE, ChainResult, Reference, StageCommit, agree, allowed_tokens,
                                    distance, judge, resolve, sketch)

pytestmark = pytest.mark.timeout(30)

H = 64
g = torch.Generator().manual_seed(0)
TRUE = {2: torch.randn(H, generator=g), 4: torch.randn(H, generator=g), 6: torch.randn(100, generator=g)}  # 6: logits
REF = Reference(outputs={k: sketch(v) for k, v in TRUE.items()}, tokens=frozenset({7}))


def chain(replica: int, nodes=("a", "b", "c"), *, bad: dict | None = None, bad_input: dict | None = None,
          token: int = 7) -> ChainResult:
    """A chain of 3 stages (layers 0-2, 2-4, 4-6) committing to TRUE, except stage k of ``bad``
    (its output perturbed by noise of the vector's own scale, as SWARM_FAULT does) and the
    received input of stage k in ``bad_input``."""
    bad, bad_input = bad or {}, bad_input or {}
    stages, prev = [], None
    for k, (lo, hi) in enumerate([(0, 2), (2, 4), (4, 6)]):
        out = TRUE[hi] + (bad[k] * TRUE[hi].std() * torch.randn(TRUE[hi].shape, generator=g) if k in bad else 0)
        inp = () if prev is None else sketch(prev + (torch.randn(H, generator=g) if k in bad_input else 0))
        stages.append(StageCommit(node_id=nodes[k], first_layer=lo, last_layer_excl=hi, input=inp, output=sketch(out)))
        prev = out
    return ChainResult(replica=replica, stages=tuple(stages), token=token)


def test_sketch_is_the_same_everywhere_and_estimates_relative_distance():
    x = torch.randn(H, generator=g)
    assert sketch(x) == sketch(x.clone()) and len(sketch(x)) == SKETCH_DIM
    assert distance(sketch(x), sketch(x)) == 0.0
    # honest float noise is far below the tolerance, a perturbation of the vector's scale far above
    assert distance(sketch(x + 1e-5 * torch.randn(H, generator=g)), sketch(x)) < TOLERANCE / 100
    assert distance(sketch(x + x.std() * torch.randn(H, generator=g)), sketch(x)) > 3 * TOLERANCE
    assert distance((), sketch(x)) == math.inf and distance(sketch(x)[:-1], sketch(x)) == math.inf
    assert distance(tuple([math.nan] * SKETCH_DIM), sketch(x)) == math.inf


def test_honest_chains_agree_and_the_token_is_released_without_a_second_opinion():
    a, b = chain(0, "abc"), chain(1, "def")
    assert agree(a, b)
    out = resolve(a, b, None)
    assert out.release and not out.quarantine and not out.retire and not out.disputed


def test_chains_with_different_splits_are_compared_at_the_boundaries_they_share():
    a = chain(0, "abc")
    b = ChainResult(replica=1, token=7, stages=(
        StageCommit(node_id="d", first_layer=0, last_layer_excl=4, output=REF.outputs[4]),
        StageCommit(node_id="e", first_layer=4, last_layer_excl=6, input=REF.outputs[4], output=REF.outputs[6])))
    assert agree(a, b)
    assert not agree(a, chain(1, "def", token=8))


@pytest.mark.parametrize("serving_bad", [True, False])
def test_the_wrong_stage_is_quarantined_and_the_token_held_only_when_the_serving_chain_is_wrong(serving_bad):
    wrong = chain(0 if serving_bad else 1, ("a", "b", "c") if serving_bad else ("d", "e", "f"), bad={1: 1.0})
    right = chain(1 if serving_bad else 0, ("d", "e", "f") if serving_bad else ("a", "b", "c"))
    serving, checker = (wrong, right) if serving_bad else (right, wrong)
    assert not agree(serving, checker)
    j = judge(wrong, REF)
    assert not j.ok and j.guilty == ("b" if serving_bad else "e") and "stage 1" in j.reason
    assert judge(right, REF).ok
    out = resolve(serving, checker, REF)
    assert out.release is not serving_bad
    assert [n for n, _ in out.quarantine] == [j.guilty] and out.retire == (wrong.replica,) and out.disputed


def test_a_wrong_stage_is_blamed_not_the_stages_after_it():
    # stage 0 wrong: stage 1 computed on a wrong input and its output is wrong too; only stage 0 is blamed
    c = chain(0, bad={0: 1.0, 1: 1.0, 2: 1.0})
    assert judge(c, REF).guilty == "a"


def test_a_hop_that_changed_in_flight_retires_the_chain_without_blaming_either_end():
    c = chain(0, bad_input={2: True})
    j = judge(c, REF)
    assert not j.ok and j.guilty is None and "lies" in j.reason
    out = resolve(c, chain(1, "def"), REF)
    assert not out.release and out.retire == (0,) and not out.quarantine


def test_a_wrong_token_with_right_logits_blames_the_last_stage():
    c = chain(0, token=3)
    assert judge(c, REF).guilty == "c"


def test_a_stage_that_does_not_commit_cannot_pass():
    c = chain(0)
    c = ChainResult(replica=0, token=7, stages=c.stages[:1] + (StageCommit(node_id="b", first_layer=2, last_layer_excl=4,
                                                                             input=c.stages[1].input),) + c.stages[2:])
    assert judge(c, REF).guilty == "b"


def test_without_a_second_opinion_a_disagreement_retires_the_serving_chain_and_quarantines_nobody():
    out = resolve(chain(0, bad={1: 1.0}), chain(1, "def"), None)
    assert not out.release and out.retire == (0,) and not out.quarantine


def test_no_checker_means_the_check_is_void():
    out = resolve(chain(0, bad={1: 1.0}), None, None)
    assert out.release and not out.quarantine


def test_allowed_tokens_greedy_keeps_near_ties_only():
    logits = torch.zeros(10)
    logits[3], logits[5] = 5.0, 5.0 - 1e-4
    logits[1] = 2.0
    assert allowed_tokens(logits, SamplingParams()) == frozenset({3, 5})
    sampled = allowed_tokens(logits, SamplingParams(temperature=1.0, top_k=3))
    assert sampled == frozenset({1, 3, 5})


def test_a_stage_whose_cache_holds_unchecked_inputs_is_not_blamed_but_the_first_stage_is():
    from dataclasses import replace

    stale = replace(chain(0, bad={1: 1.0}), fresh=False)  # stage 1 wrong from a right input
    j = judge(stale, REF)
    assert not j.ok and j.guilty is None and "not blamed" in j.reason
    out = resolve(stale, chain(1, "def"), REF)
    assert not out.release and out.retire == (0,) and not out.quarantine
    # the first stage's cache holds only tokens: it is blamed whatever the history
    assert judge(replace(chain(0, bad={0: 1.0}), fresh=False), REF).guilty == "a"
