"""Tiny real checkpoints for tests and demos: config.json + safetensors + a trained tokenizer.json.

Needs only torch, safetensors and tokenizers (not transformers), so any engineer's tests can make
a model directory in a temporary folder in well under a second.
"""

from __future__ import annotations

from pathlib import Path

from swarm.model.checkpoint import save_checkpoint
from swarm.model.config import ModelConfig
from swarm.model.stage import build_stage

EOS_TOKEN = "<|endoftext|>"

# A few paragraphs of plain English to train a tiny BPE on; any text works.
_SAMPLE_TEXT = """\
The swarm pools volunteer graphics cards over ordinary internet links to train and serve language
models. Each node holds a few layers of the model, receives activations from the node before it,
and sends its own activations to the node after it. Gradients flow back the same way.
A coordinator keeps the list of nodes, measures the links between them, and plans which node holds
which layers. When a node leaves, the plan changes and training goes on from the last checkpoint.
Compressing the activations at each boundary to a few bits makes slow links usable: the change of
a sample's activation since its last visit is small, so it fits in two or three bits per number.
Once upon a time there was a small model that learned to finish sentences. It read quotations,
poems and source code, and it learned that a quick brown fox jumps over the lazy dog.
"""


def train_tiny_tokenizer(path: str | Path, *, vocab_size: int = 384, text: str | None = None) -> Path:
    """Train a byte-level BPE on ``text`` (a built-in sample when None); write ``tokenizer.json``.

    Returns the file path. The vocabulary holds the 256 byte symbols, merges, and ``<|endoftext|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (text or _SAMPLE_TEXT).splitlines()
    tok.train_from_iterator(corpus, trainer=trainer)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out / "tokenizer.json"


def make_tiny_checkpoint(
    path: str | Path,
    family: str = "gpt2",
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    tokenizer_vocab_size: int = 384,
    with_tokenizer: bool = True,
    tie_word_embeddings: bool | None = None,
    seed: int = 0,
    max_shard_bytes: int | None = None,
) -> ModelConfig:
    """Write a randomly initialised (seeded) GPT-2 or Llama model directory at ``path``.

    With ``with_tokenizer`` a BPE ``tokenizer.json`` is trained first and the model's vocabulary
    matches it; without, the model is byte-level (vocab 257: bytes + eos 256) and
    :func:`swarm.model.load_tokenizer` falls back to bytes. Returns the model config.
    """
    from tokenizers import Tokenizer

    path = Path(path)
    if with_tokenizer:
        tok_file = train_tiny_tokenizer(path, vocab_size=tokenizer_vocab_size)
        tok = Tokenizer.from_file(str(tok_file))
        vocab = tok.get_vocab_size(with_added_tokens=True)
        eos = tok.token_to_id(EOS_TOKEN)
    else:
        vocab, eos = 257, 256
    if family == "llama":
        kv = num_kv_heads if num_kv_heads is not None else max(1, num_heads // 2)
        inter = intermediate_size or 2 * hidden_size
        tie = False if tie_word_embeddings is None else tie_word_embeddings
        norm_eps = 1e-6
    else:
        kv = num_heads
        inter = intermediate_size or 4 * hidden_size
        tie = True if tie_word_embeddings is None else tie_word_embeddings
        norm_eps = 1e-5
    config = ModelConfig(
        family=family,
        vocab_size=vocab,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=kv,
        intermediate_size=inter,
        max_position_embeddings=max_position_embeddings,
        norm_eps=norm_eps,
        tie_word_embeddings=tie,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = build_stage(config, 0, num_layers, seed=seed)
    save_checkpoint(path, config, model.hf_state_dict(), max_shard_bytes=max_shard_bytes)
    return config
