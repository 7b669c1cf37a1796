"""AdamW state survives a checkpoint across a different layer split (swarm/pipeline/optim_state.py)."""

from __future__ import annotations

import zlib

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from swarm.errors import InvalidRequestError
from swarm.model.config import ModelConfig
from swarm.model.stage import build_stage
from swarm.pipeline.optim import OptimConfig, make_optimizer
from swarm.pipeline.optim_state import STEP_KEY, load_stage_optimizer_state, stage_optimizer_state

CFG = ModelConfig(family="gpt2", vocab_size=64, hidden_size=16, num_layers=4, num_heads=2, max_position_embeddings=32)


def _split(ranges, tensors=None):
    """Stages over ``ranges`` (HF weights ``tensors`` loaded, else the seeded init) and their AdamWs."""
    stages = []
    for i, (a, b) in enumerate(ranges):
        st = build_stage(CFG, a, b, is_first=i == 0, is_last=i == len(ranges) - 1, seed=0)
        if tensors is not None:
            st.load_hf_state(tensors)
        stages.append((st, make_optimizer(st.parameters(), OptimConfig(lr=1e-2, weight_decay=0.1))))
    return stages


def _weights(stages) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for st, _ in stages for k, v in st.hf_state_dict().items()}


def _step(stages, k: int) -> None:
    """One AdamW step with a gradient that depends only on the HF name and ``k`` (split-independent)."""
    from swarm.model.hf_names import local_to_hf

    for st, opt in stages:
        for local, p in st.named_parameters():
            hf, transpose = local_to_hf(CFG, local, st.first_layer)
            g = torch.Generator().manual_seed(zlib.crc32(f"{hf}/{k}".encode()))
            shape = tuple(p.shape)[::-1] if transpose else tuple(p.shape)
            grad = torch.randn(shape, generator=g)
            p.grad = grad.t().contiguous() if transpose else grad
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_optimizer_state_round_trips_across_a_different_layer_split():
    whole = _split([(0, 4)])
    a = _split([(0, 2), (2, 4)], tensors=_weights(whole))
    for k in range(3):
        _step(whole, k)
        _step(a, k)
    # checkpoint split a: weights and optimizer state by HF name, through safetensors bytes
    weights = _weights(a)
    merged: dict[str, torch.Tensor] = {}
    for st, opt in a:
        merged.update(st_load(st_save(stage_optimizer_state(st, opt))))
    assert float(merged[STEP_KEY]) == 3
    assert any(k.startswith("exp_avg_sq.") for k in merged) and any(k.startswith("exp_avg.") for k in merged)
    # resume on another split: one layer, then three
    b = _split([(0, 1), (1, 4)], tensors=weights)
    for st, opt in b:
        assert load_stage_optimizer_state(st, opt, merged) == 3
    for k in range(3, 5):
        _step(whole, k)
        _step(b, k)
    got, want = _weights(b), _weights(whole)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
    # a restarted optimizer (moments at zero, step 1) ends elsewhere: the state mattered
    c = _split([(0, 1), (1, 4)], tensors=weights)
    for k in range(3, 5):
        _step(c, k)
    assert any(not torch.allclose(_weights(c)[n], want[n]) for n in want)


def test_loading_refuses_a_state_that_lacks_a_parameter():
    (st, opt), = _split([(0, 4)])
    _step([(st, opt)], 0)
    state = stage_optimizer_state(st, opt)
    del state[next(k for k in state if k.startswith("exp_avg.") and ".h.2." in k)]
    with pytest.raises(InvalidRequestError, match="lacks"):
        load_stage_optimizer_state(st, opt, state)
    with pytest.raises(InvalidRequestError, match="adamw.step"):
        load_stage_optimizer_state(st, opt, {})
