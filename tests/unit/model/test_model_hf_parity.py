"""Our GPT-2 and Llama stages against `transformers` (a test-only dependency): same logits."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from swarm.model import ModelConfig, load_checkpoint, load_stage, save_checkpoint  # noqa: E402


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Give every weight a non-trivial value so a wrong mapping shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def _hf_gpt2(tmp_path, *, shard: bool = False):
    cfg = transformers.GPT2Config(
        vocab_size=97, n_embd=48, n_layer=3, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    _perturb(model, 1)
    model.save_pretrained(tmp_path, max_shard_size="40KB" if shard else "10GB")
    return model


def _hf_llama(tmp_path, *, shard: bool = False, tie: bool = False):
    cfg = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=64, rope_theta=500.0, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    _perturb(model, 2)
    model.save_pretrained(tmp_path, max_shard_size="40KB" if shard else "10GB")
    return model


@pytest.mark.parametrize("family,shard", [("gpt2", False), ("gpt2", True), ("llama", False), ("llama", True)])
def test_loaded_checkpoint_gives_transformers_logits(tmp_path, family, shard):
    hf = _hf_gpt2(tmp_path, shard=shard) if family == "gpt2" else _hf_llama(tmp_path, shard=shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    cfg = ModelConfig.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    ours = load_stage(tmp_path, 0, cfg.num_layers)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_tied_llama_loads(tmp_path):
    hf = _hf_llama(tmp_path, tie=True)
    ours = load_stage(tmp_path, 0, 3)
    ids = torch.randint(0, 101, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_saved_from_stages_loads_in_transformers(tmp_path, family):
    src, dst = tmp_path / "src", tmp_path / "dst"
    hf = _hf_gpt2(src) if family == "gpt2" else _hf_llama(src)
    cfg = ModelConfig.from_hf_config(json.loads((src / "config.json").read_text()))
    # a job exports the assembled model from its per-stage shards
    stages = [load_stage(src, 0, 1), load_stage(src, 1, 2), load_stage(src, 2, 3)]
    save_checkpoint(dst, cfg, *(s.hf_state_dict() for s in stages), max_shard_bytes=30_000)
    back = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_load_checkpoint_reads_only_the_stage_tensors(tmp_path):
    _hf_llama(tmp_path, shard=True)
    mid = load_checkpoint(tmp_path, range(1, 2))
    assert mid.tensors and all(n.startswith("model.layers.1.") for n in mid.tensors)
    last = load_checkpoint(tmp_path, range(2, 3))
    assert "lm_head.weight" in last.tensors and "model.norm.weight" in last.tensors
    assert "model.embed_tokens.weight" not in last.tensors
    first = load_checkpoint(tmp_path, range(0, 1), dtype=torch.float16)
    assert first.tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert not any(n.startswith("model.layers.1.") for n in first.tensors)


def test_checkpoint_without_the_lm_model_prefix_loads(tmp_path):
    """The original GPT-2 release names tensors ``h.0.attn...``, ``wte.weight`` (no ``transformer.``)."""
    from safetensors.torch import load_file, save_file

    hf = _hf_gpt2(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    stripped = {n.removeprefix("transformer."): t.contiguous() for n, t in tensors.items() if n != "lm_head.weight"}
    save_file(stripped, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = load_stage(tmp_path, 0, 3)
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
