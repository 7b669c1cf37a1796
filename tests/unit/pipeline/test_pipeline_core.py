"""Data order, schedules, optimiser schedule and the single-process reference trainer."""

import numpy as np
import pytest
import torch

from swarm.errors import InvalidRequestError
from swarm.model.config import ModelConfig
from swarm.pipeline import schedule
from swarm.pipeline.data import BatchOrder, TokenDataset, tokenize
from swarm.pipeline.job_model import init_tensors, split_layers, untie
from swarm.pipeline.optim import OptimConfig, clip_and_step, lr_at
from swarm.pipeline.reference import train_reference

TINY = ModelConfig(family="gpt2", vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, max_position_embeddings=32)


def _dataset(num=24, seq=8, seed=0) -> TokenDataset:
    rng = np.random.default_rng(seed)
    # a learnable pattern: every row counts upward from a random start
    start = rng.integers(0, 64, size=(num, 1))
    return TokenDataset(tokens=(start + np.arange(seq + 1)) % 64, key="k")


def test_tokenize_windows_cover_every_label_once():
    ds = tokenize(["abcdefghij", "klm"], encode=lambda s: [ord(c) for c in s], seq_len=4, eos_id=0)
    stream = [ord(c) for c in "abcdefghij"] + [0] + [ord(c) for c in "klm"] + [0]
    assert ds.num_samples == (len(stream) - 1) // 4
    labels = ds.labels(range(ds.num_samples)).reshape(-1).tolist()
    assert labels == stream[1 : 1 + len(labels)]
    assert np.array_equal(ds.inputs([1])[0, 1:], ds.labels([1])[0, :-1])
    with pytest.raises(InvalidRequestError, match="seq-len"):
        tokenize(["ab"], encode=lambda s: [1, 2], seq_len=8, eos_id=None)


def test_batch_order_is_a_permutation_per_epoch_and_splits_replicas():
    order = BatchOrder(num_samples=10, batch_size=4, micro_batch_size=2, num_replicas=2, seed=3)
    assert order.steps_per_epoch == 2 and order.steps_for_epochs(2) == 4
    for epoch in range(3):  # each epoch: 8 distinct samples of a fresh permutation
        seen = np.concatenate([order.step_samples(2 * epoch + t) for t in range(2)])
        assert len(set(seen.tolist())) == 8 and set(seen.tolist()) <= set(range(10))
    assert not np.array_equal(order.step_samples(0), order.step_samples(2))
    mbs = order.micro_batches(1, 0) + order.micro_batches(1, 1)
    assert np.array_equal(np.concatenate(mbs), order.step_samples(1))
    assert order.num_micro_batches == 1
    with pytest.raises(InvalidRequestError, match="exceeds"):
        BatchOrder(num_samples=3, batch_size=4, micro_batch_size=2)
    with pytest.raises(InvalidRequestError, match="micro-batches"):
        BatchOrder(num_samples=10, batch_size=6, micro_batch_size=4)


@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("micro", [1, 3, 6])
def test_schedules_run_each_micro_batch_once_in_dependency_order(stages, micro):
    for s in range(stages):
        for name in schedule.SCHEDULES:
            ops = schedule.build(name, num_micro_batches=micro, stage=s, num_stages=stages)
            assert sorted(o.micro_batch for o in ops if o.kind == "F") == list(range(micro))
            assert [o.micro_batch for o in ops if o.kind == "B"] == list(range(micro))
            for i, op in enumerate(ops):
                if op.kind == "B":
                    assert schedule.Op("F", op.micro_batch) in ops[:i]
    one = schedule.one_f_one_b(6, 0, 3)
    assert [o.kind for o in one[:4]] == ["F", "F", "F", "B"]  # two warm-up forwards on stage 0 of 3


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = [lr_at(t, cfg) for t in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[14] == pytest.approx(0.1) and lrs[19] == pytest.approx(0.1)


def test_untie_copies_the_embedding_into_the_head():
    tensors = init_tensors(TINY, seed=0)
    assert "lm_head.weight" not in tensors
    cfg, untied = untie(TINY, tensors)
    assert not cfg.tie_word_embeddings
    assert torch.equal(untied["lm_head.weight"], tensors["transformer.wte.weight"])
    assert split_layers(5, 3) == [(0, 2), (2, 4), (4, 5)]


LLAMA = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, max_position_embeddings=32)


@pytest.mark.parametrize("model", [TINY, LLAMA], ids=["gpt2", "llama"])
def test_reference_split_in_three_stages_equals_one_stage_and_learns(model):
    cfg, tensors = untie(model, init_tensors(model, seed=1))
    ds = _dataset()
    order = BatchOrder(num_samples=ds.num_samples, batch_size=8, micro_batch_size=2, num_replicas=2, seed=0)
    optim = OptimConfig(lr=3e-3, warmup_steps=2, total_steps=12, grad_clip=0.0)
    one, _ = train_reference(config=cfg, tensors=tensors, dataset=ds, order=order, optim=optim,
                             ranges=[(0, 3)], steps=12)
    three, _ = train_reference(config=cfg, tensors=tensors, dataset=ds, order=order, optim=optim,
                               ranges=split_layers(3, 3), steps=12)
    assert three == pytest.approx(one, rel=1e-4)
    assert three[-1] < three[0] - 0.5


@pytest.mark.parametrize("model", [TINY, LLAMA], ids=["gpt2", "llama"])
def test_clipping_does_not_depend_on_how_the_layers_are_split(model):
    """Clipped gradients (a threshold low enough to clip every step): two splits into stages
    train the same model, bit for bit, and one stage trains it to float tolerance. With one norm
    per stage two runs of a job the planner split differently diverged from step 2 on."""
    cfg, tensors = untie(model, init_tensors(model, seed=1))
    ds = _dataset()
    order = BatchOrder(num_samples=ds.num_samples, batch_size=8, micro_batch_size=2, num_replicas=2, seed=0)
    optim = OptimConfig(lr=3e-3, warmup_steps=2, total_steps=12, grad_clip=0.05)
    runs = [train_reference(config=cfg, tensors=tensors, dataset=ds, order=order, optim=optim, ranges=r, steps=12)
            for r in ([(0, 3)], [(0, 1), (1, 2), (2, 3)], [(0, 2), (2, 3)])]
    (one, _), (three, stages3), (two, stages2) = runs
    assert three == two
    w3 = {k: v for s in stages3 for k, v in s.hf_state_dict().items()}
    w2 = {k: v for s in stages2 for k, v in s.hf_state_dict().items()}
    assert w3.keys() == w2.keys() and all(torch.equal(w3[k], w2[k]) for k in w3)
    assert three == pytest.approx(one, rel=1e-4)
    unclipped, _ = train_reference(config=cfg, tensors=tensors, dataset=ds, order=order,
                                   optim=OptimConfig(lr=3e-3, warmup_steps=2, total_steps=12, grad_clip=0.0),
                                   ranges=[(0, 1), (1, 2), (2, 3)], steps=12)
    assert unclipped != three  # the threshold did clip (AdamW barely minds: it rescales each element)


def test_clip_scales_each_tensor_to_its_share_of_the_whole_model_threshold():
    a = torch.nn.Parameter(torch.zeros(3))  # 3 of the model's 12 parameters: limit 2 * sqrt(3 / 12) = 1
    b = torch.nn.Parameter(torch.zeros(1))  # 1 of 12: limit 2 * sqrt(1 / 12) = 0.577
    a.grad, b.grad = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.5])
    opt = torch.optim.SGD([a, b], lr=1.0)
    norm = clip_and_step(opt, [a, b], 0, OptimConfig(lr=1.0, grad_clip=2.0, clip_params=12))
    assert norm == pytest.approx(float(torch.tensor([5.0, 0.5]).norm()))
    assert torch.allclose(a.detach(), -torch.tensor([0.6, 0.0, 0.8]), atol=1e-5)  # scaled to norm 1
    assert torch.allclose(b.detach(), torch.tensor([-0.5]))  # under its limit: as it was
    with pytest.raises(InvalidRequestError, match="clip_params"):
        OptimConfig(clip_params=-1)
