"""Data order, schedules, optimiser schedule and the single-process reference trainer."""

import numpy as np
import pytest
import torch

from swarm.errors import InvalidRequestError
from swarm.model.config import ModelConfig
from swarm.pipeline import schedule
from swarm.pipeline.data import BatchOrder, TokenDataset, tokenize
from swarm.pipeline.job_model import init_tensors, split_layers, untie
from swarm.pipeline.optim import OptimConfig, lr_at
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
