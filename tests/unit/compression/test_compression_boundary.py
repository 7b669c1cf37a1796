"""The single-process compressed boundary: autograd, determinism, and a short training run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from swarm.compression import CodecSpec, CompressedBoundary, boundary_seed
from swarm.model import ModelConfig, StageModel, build_stage

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CFG = ModelConfig(family="gpt2", vocab_size=32, hidden_size=32, num_layers=2, num_heads=2,
                  max_position_embeddings=16, tie_word_embeddings=False)


def _stages(device):
    full = build_stage(CFG, 0, 2, seed=0)
    s0 = StageModel(CFG, 0, 1, is_first=True, is_last=False)
    s1 = StageModel(CFG, 1, 2, is_first=False, is_last=True)
    for s in (s0, s1):
        s.load_hf_state(full.hf_state_dict())
    return s0.to(device), s1.to(device)


def test_none_boundary_is_exact_and_counts_bytes():
    x = torch.randn(2, 4, 8, requires_grad=True)
    b = CompressedBoundary("none", key="k", serialize=True)
    y = b(x, [0, 1])
    (y * torch.arange(8.0)).sum().backward()
    assert torch.equal(y, x) and torch.equal(x.grad, torch.arange(8.0).expand(2, 4, 8))
    assert b.stats.forward_bytes > 2 * 4 * 8 * 4 and b.stats.backward_bytes == b.stats.forward_bytes
    assert b.stats.act_rel_error == 0.0 and b.stats.grad_rel_error == 0.0


def test_without_sample_ids_the_boundary_is_a_pass_through():
    b = CompressedBoundary("aqsgd:fw=2,bw=4", key="k", num_samples=4)
    x = torch.randn(1, 3, 8)
    assert b(x) is x and b.upstream is None


@pytest.mark.parametrize("spec", ["direct:fw=3,bw=5", "aqsgd:fw=2,bw=4", "aqsgd:fw=2,bw=4,ef=1"])
def test_serialized_and_in_memory_paths_give_the_same_numbers(spec):
    """The wire path (bytes) and the in-memory messages are the same computation."""
    outs = []
    for serialize in (False, True):
        torch.manual_seed(0)
        b = CompressedBoundary(spec, key="k", num_samples=8, serialize=serialize)
        x = torch.randn(4, 3, 16, requires_grad=True)
        res = []
        for step in range(3):
            y = b(x * (1 + 0.1 * step), [1, 3, 5, 7])
            (y.pow(2).sum()).backward()
            res += [y.detach().clone(), x.grad.clone()]
            x.grad = None
        outs.append(res)
    for a, c in zip(*outs):
        assert torch.equal(a, c)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", ["aqsgd:fw=2,bw=4", "direct:fw=4,bw=8"])
def test_training_through_the_boundary_lowers_the_loss(spec, device):
    s0, s1 = _stages(device)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 8, (16, 13), generator=gen)  # a small vocabulary: learnable quickly
    data[:, 1::2] = (data[:, 0::2][:, : data[:, 1::2].shape[1]] + 1) % 8  # odd positions follow even ones
    b = CompressedBoundary(spec, key="train-test", num_samples=16, device=device, seed=boundary_seed(CodecSpec.parse(spec), 0))
    opt = torch.optim.AdamW([*s0.parameters(), *s1.parameters()], lr=3e-3)
    losses = []
    for epoch in range(12):
        for i in range(0, 16, 8):
            ids = torch.arange(i, i + 8)
            batch = data[ids].to(device)
            logits = s1(b(s0(batch[:, :-1]), ids))
            loss = F.cross_entropy(logits.reshape(-1, CFG.vocab_size), batch[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert b.stats.forward_messages == 24 and b.stats.backward_messages == 24
    if spec.startswith("aqsgd"):
        assert torch.equal(b.upstream.store.rows, b.downstream.store.rows)
