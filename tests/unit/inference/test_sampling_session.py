"""Sampling (seeded, per-position) and the coordinator's per-session text/stop logic."""

from __future__ import annotations

import pytest
import torch

from swarm.errors import InvalidRequestError
from swarm.inference.sampling import SamplingParams, filtered_logits, sample_batch, sample_token
from swarm.inference.session import GenerationState


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample_token(logits, SamplingParams(), position=5) == 1


def test_sampling_depends_only_on_seed_and_position():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g)
    p = SamplingParams(temperature=1.0, seed=7)
    a = [sample_token(logits, p, position=i) for i in range(20)]
    b = [sample_token(logits, p, position=i) for i in range(20)]
    assert a == b
    assert len(set(a)) > 3  # it does sample
    c = [sample_token(logits, SamplingParams(temperature=1.0, seed=8), position=i) for i in range(20)]
    assert a != c
    # batching does not change per-row draws
    batch = sample_batch(torch.stack([logits, logits]), [p, SamplingParams()], [3, 3])
    assert batch == [a[3], int(torch.argmax(logits))]


def test_top_k_and_top_p_filter():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    x = filtered_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isinf(x[2:]).all() and torch.isfinite(x[:2]).all()
    y = filtered_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.isfinite(y[:2]).all() and torch.isinf(y[2:]).all()  # 0.5 < 0.7 <= 0.8
    z = filtered_logits(logits, SamplingParams(temperature=1.0, top_p=0.4))
    assert torch.isfinite(z[0]) and torch.isinf(z[1:]).all()
    for pos in range(30):
        assert sample_token(logits, SamplingParams(temperature=1.0, top_k=2, seed=1), position=pos) in (0, 1)


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5), dict(max_new_tokens=0), dict(stop=("",))],
)
def test_bad_sampling_params(kwargs):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)


def _decode(ids: list[int]) -> str:
    return "".join(chr(ord("a") + i) for i in ids)


def test_generation_stops_at_max_tokens():
    st = GenerationState(prompt_ids=[1], params=SamplingParams(max_new_tokens=3), decode=_decode)
    evs = [st.push(t) for t in (0, 1, 2)]
    assert [e.text for e in evs] == ["a", "b", "c"]
    assert evs[-1].finish_reason == "length" and st.done and st.all_ids == [1, 0, 1, 2]


def test_stop_string_across_tokens_is_cut_and_held_back():
    st = GenerationState(prompt_ids=[1], params=SamplingParams(max_new_tokens=10, stop=("cd",)), decode=_decode)
    assert st.push(0).text == "a"
    assert st.push(1).text == "b"
    e = st.push(2)  # "c" could start "cd": held back
    assert e.text == "" and e.finish_reason is None
    e = st.push(3)
    assert e.finish_reason == "stop" and e.text == "" and st.text == "ab"


def test_held_text_released_when_no_stop():
    st = GenerationState(prompt_ids=[1], params=SamplingParams(max_new_tokens=10, stop=("cd",)), decode=_decode)
    st.push(2)
    assert st.push(4).text == "ce"


def test_eos_ends_without_text():
    st = GenerationState(prompt_ids=[1], params=SamplingParams(max_new_tokens=10), decode=_decode, eos_token_id=25)
    st.push(0)
    e = st.push(25)
    assert e.finish_reason == "eos" and st.text == "a" and st.generated == [0, 25]


def test_empty_prompt_rejected():
    with pytest.raises(InvalidRequestError):
        GenerationState(prompt_ids=[], params=SamplingParams(), decode=_decode)
