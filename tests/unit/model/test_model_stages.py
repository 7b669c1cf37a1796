"""Stage splitting, KV caches, config translation, tokenizers and tiny checkpoints (no transformers)."""

from __future__ import annotations

import pytest
import torch

from swarm.errors import CapacityError, ConfigError, InvalidRequestError
from swarm.model import (
    ByteTokenizer,
    ModelConfig,
    StageModel,
    build_stage,
    load_checkpoint,
    load_stage,
    load_tokenizer,
)
from swarm.model.testing import make_tiny_checkpoint

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _config(family: str) -> ModelConfig:
    if family == "gpt2":
        return ModelConfig(family="gpt2", vocab_size=61, hidden_size=32, num_layers=4, num_heads=4,
                           max_position_embeddings=48, tie_word_embeddings=False)
    return ModelConfig(family="llama", vocab_size=61, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                       intermediate_size=48, max_position_embeddings=48, tie_word_embeddings=False)


def _split(full: StageModel, bounds: list[int]) -> list[StageModel]:
    cfg = full.config
    stages = []
    for i in range(len(bounds) - 1):
        s = StageModel(cfg, bounds[i], bounds[i + 1], is_first=i == 0, is_last=i == len(bounds) - 2)
        s.load_hf_state(full.hf_state_dict())
        stages.append(s.to(next(full.parameters()).device))
    return stages


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("bounds", [[0, 1, 4], [0, 2, 3, 4], [0, 1, 2, 3, 4]])
def test_split_stages_equal_the_whole_model(family, bounds, device):
    full = build_stage(_config(family), 0, 4, seed=7, device=device)
    ids = torch.randint(0, 61, (3, 10), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        want = full(ids)
        h = ids
        for s in _split(full, bounds):
            h = s(h)
    assert torch.equal(h, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_decoding_matches_full_forward(family, device):
    full = build_stage(_config(family), 0, 4, seed=3, device=device)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(2)).to(device)
    stages = _split(full, [0, 2, 4])
    caches = [s.new_kv_cache(batch_size=2, max_length=16) for s in stages]
    with torch.no_grad():
        want = full(ids)
        outs = []
        for lo, hi in [(0, 5), (5, 6), (6, 7), (7, 12)]:  # prefill, then single tokens, then a chunk
            h = ids[:, lo:hi]
            for s, c in zip(stages, caches):
                h = s(h, kv_cache=c)
            outs.append(h)
    torch.testing.assert_close(torch.cat(outs, dim=1), want, atol=1e-5, rtol=1e-5)
    assert caches[0].lengths.tolist() == [12, 12]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_sessions_of_different_lengths(family):
    """Two sessions prefilled separately, then decoded together in one batch."""
    model = build_stage(_config(family), 0, 4, seed=5)
    a = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(3))
    b = torch.randint(0, 61, (1, 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ca, cb = model.new_kv_cache(batch_size=1, max_length=20), model.new_kv_cache(batch_size=1, max_length=20)
        model(a[:, :-1], kv_cache=ca)
        model(b[:, :-1], kv_cache=cb)
        both = type(ca).cat([ca, cb])
        step = model(torch.cat([a[:, -1:], b[:, -1:]]), kv_cache=both)
        want_a, want_b = model(a)[:, -1], model(b)[:, -1]
    torch.testing.assert_close(step[0, -1], want_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, -1], want_b[0], atol=1e-5, rtol=1e-5)
    assert both.lengths.tolist() == [9, 4]
    only_b = both.select([1])
    assert only_b.lengths.tolist() == [4]


def test_position_offset_shifts_positions():
    """Rotary attention depends only on relative positions; learned GPT-2 positions do not."""
    ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(9))
    llama, gpt2 = build_stage(_config("llama"), 0, 4, seed=1), build_stage(_config("gpt2"), 0, 4, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(llama(ids, position_offset=7), llama(ids), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(gpt2(ids, position_offset=7), gpt2(ids))
        per_row = gpt2(ids, position_offset=torch.tensor([0, 7]))
        torch.testing.assert_close(per_row[1], gpt2(ids[1:], position_offset=7)[0])
        torch.testing.assert_close(per_row[0], gpt2(ids[:1])[0])


def test_cache_overflow_and_bad_inputs_raise():
    model = build_stage(_config("gpt2"), 0, 4, seed=1)
    cache = model.new_kv_cache(batch_size=1, max_length=4)
    with pytest.raises(CapacityError):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
    with pytest.raises(InvalidRequestError):
        model(torch.zeros(1, 49, dtype=torch.long))  # past max positions
    mid = build_stage(_config("gpt2"), 1, 3)
    with pytest.raises(InvalidRequestError):
        mid(torch.zeros(1, 3, dtype=torch.long))  # a middle stage takes hidden states
    with pytest.raises(InvalidRequestError):
        StageModel(_config("gpt2"), 1, 3, is_first=True, is_last=False)


def test_config_round_trips_through_hf_dicts():
    for family in ("gpt2", "llama"):
        cfg = _config(family)
        assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
    with pytest.raises(ConfigError):
        ModelConfig.from_hf_config({"model_type": "bert"})
    with pytest.raises(ConfigError):
        ModelConfig(family="llama", vocab_size=10, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=3)
    assert _config("gpt2").num_parameters() == sum(p.numel() for p in build_stage(_config("gpt2"), 0, 4).parameters())
    assert _config("llama").num_parameters() == sum(p.numel() for p in build_stage(_config("llama"), 0, 4).parameters())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tiny_checkpoint_with_tokenizer(tmp_path, family):
    cfg = make_tiny_checkpoint(tmp_path, family, num_layers=2, hidden_size=32, num_heads=4, max_shard_bytes=20_000)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "model.safetensors.index.json").is_file()
    tok = load_tokenizer(tmp_path)
    text = "The swarm trains a model over slow links."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert max(ids) < cfg.vocab_size and tok.eos_token_id == cfg.eos_token_id
    model = load_stage(tmp_path, 0, 2)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), cfg.vocab_size)
    assert set(load_checkpoint(tmp_path, range(1, 2)).tensors) >= {n for n in model.hf_state_dict() if ".1." in n}


def test_byte_tokenizer_fallback(tmp_path):
    make_tiny_checkpoint(tmp_path, "gpt2", num_layers=1, hidden_size=32, num_heads=2, with_tokenizer=False)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, ByteTokenizer) and tok.eos_token_id == 256
    assert tok.decode(tok.encode("héllo")) == "héllo"
    with pytest.raises(ConfigError):
        ByteTokenizer(vocab_size=100)


def test_tied_split_gives_last_stage_a_head_copy(tmp_path):
    make_tiny_checkpoint(tmp_path, "gpt2", num_layers=2, hidden_size=32, num_heads=2)
    whole = load_stage(tmp_path, 0, 2)
    first, last = load_stage(tmp_path, 0, 1), load_stage(tmp_path, 1, 2)
    assert whole.lm_head.weight is whole.wte.weight
    assert torch.equal(last.lm_head.weight, first.wte.weight)
    ids = torch.randint(0, whole.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(last(first(ids)), whole(ids))
