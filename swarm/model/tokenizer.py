"""Tokenizers from a model directory: ``tokenizer.json`` via `tokenizers`, else raw UTF-8 bytes.

A model trained from a bare ``config.json`` gets the byte-level tokenizer written out as an HF
``tokenizer.json`` (:func:`save_byte_tokenizer`), so ``transformers`` loads the trained model's
tokenizer with the same ids the training used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

from swarm.errors import ConfigError

log = logging.getLogger(__name__)


class TextTokenizer(Protocol):
    vocab_size: int
    eos_token_id: int | None
    bos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (for models trained byte-level, or with no tokenizer.json).

    ``eos_token_id`` (and ``bos_token_id``) are extra ids past 255 when the vocabulary has room;
    decode drops ids that are not bytes and replaces invalid UTF-8.
    """

    def __init__(self, *, vocab_size: int = 256, eos_token_id: int | None = None, bos_token_id: int | None = None) -> None:
        if vocab_size < 256:
            raise ConfigError(f"a byte-level tokenizer needs a vocabulary of at least 256, the model has {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from ``tokenizer.json``."""

    def __init__(self, path: str | Path, *, eos_token_id: int | None = None, bos_token_id: int | None = None) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ConfigError(f"cannot load tokenizer {path}: {exc}") from exc
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def load_tokenizer(path: str | Path, *, vocab_size: int | None = None) -> TextTokenizer:
    """The tokenizer of a model directory: ``tokenizer.json`` if present, else bytes.

    Special token ids come from ``config.json`` (eos/bos) when present, else from
    ``tokenizer_config.json`` token strings. ``vocab_size`` (the model's) is needed for the byte
    fallback when there is no ``config.json``.
    """
    path = Path(path)
    eos = bos = None
    cfg = path / "config.json"
    if cfg.is_file():
        try:
            hf = json.loads(cfg.read_text())
            eos, bos = hf.get("eos_token_id"), hf.get("bos_token_id")
            vocab_size = vocab_size or hf.get("vocab_size")
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {cfg}: {exc}") from exc
    eos = eos[0] if isinstance(eos, list) and eos else eos
    bos = bos[0] if isinstance(bos, list) and bos else bos
    tok_file = path / "tokenizer.json"
    if tok_file.is_file():
        tok = HFTokenizer(tok_file, eos_token_id=eos, bos_token_id=bos)
        if eos is None:
            tok.eos_token_id = _special_from_tokenizer_config(path, "eos_token", tok)
        if bos is None:
            tok.bos_token_id = _special_from_tokenizer_config(path, "bos_token", tok)
        return tok
    log.info("no tokenizer.json in %s: using the byte-level tokenizer", path)
    return ByteTokenizer(vocab_size=int(vocab_size or 256), eos_token_id=eos, bos_token_id=bos)


def _special_from_tokenizer_config(path: Path, key: str, tok: HFTokenizer) -> int | None:
    f = path / "tokenizer_config.json"
    if not f.is_file():
        return None
    try:
        value = json.loads(f.read_text()).get(key)
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(value, dict):
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None


# The byte-level vocabulary: ids 0..255 are bytes; a few ids after them may be special tokens
# (eos, bos, pad) named in config.json. A model with many more ids than that was meant for a
# real tokenizer (GPT-2's 50257) and would train thousands of never-used embeddings.
BYTE_VOCAB = 256
MAX_BYTE_SPECIALS = 8
_SPECIAL_NAMES = {"eos_token_id": "<|endoftext|>", "bos_token_id": "<|startoftext|>", "pad_token_id": "<|pad|>"}


def check_byte_vocab(config_json: dict) -> dict[str, int]:
    """Check that a model config fits the byte-level tokenizer; its special ids by config key.

    Raises ConfigError saying what to pass when ``vocab_size`` does not fit (e.g. 50257 with no
    tokenizer.json) or a special id is not one of the ids after the 256 bytes.
    """
    vocab_size = config_json.get("vocab_size", config_json.get("n_vocab"))
    if not isinstance(vocab_size, int) or not BYTE_VOCAB <= vocab_size <= BYTE_VOCAB + MAX_BYTE_SPECIALS:
        raise ConfigError(
            f"vocab_size {vocab_size} but no tokenizer: pass a checkpoint directory with tokenizer.json "
            f"(or --tokenizer tokenizer.json), or set vocab_size to {BYTE_VOCAB}..{BYTE_VOCAB + MAX_BYTE_SPECIALS} "
            f"for the byte-level tokenizer (256 bytes + up to {MAX_BYTE_SPECIALS} special tokens such as eos)"
        )
    specials: dict[str, int] = {}
    for key in _SPECIAL_NAMES:
        value = config_json.get(key)
        value = value[0] if isinstance(value, list) and value else value
        if value is None:
            continue
        if not isinstance(value, int) or not BYTE_VOCAB <= value < vocab_size:
            raise ConfigError(
                f"{key} {value} does not fit the byte-level tokenizer: ids 0..255 are bytes, so special "
                f"tokens take ids {BYTE_VOCAB}..{vocab_size - 1}; set {key} in that range or remove it"
            )
        specials[key] = value
    return specials


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what the ByteLevel pieces use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def save_byte_tokenizer(out_dir: str | Path, config_json: dict) -> Path:
    """Write the byte-level tokenizer (id = byte value, special tokens after 255) as HF
    ``tokenizer.json`` + ``tokenizer_config.json`` into ``out_dir``; the tokenizer.json path.

    `tokenizers`/`transformers` load it (``PreTrainedTokenizerFast(tokenizer_file=...)``,
    ``AutoTokenizer.from_pretrained(out_dir)``) and encode exactly as :class:`ByteTokenizer`.
    Raises ConfigError when the config does not fit (see :func:`check_byte_vocab`).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    specials = check_byte_vocab(config_json)
    table = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(BYTE_VOCAB)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # one id may have several roles (eos == bos, as in GPT-2): it is named after its first role
    name_of_id: dict[int, str] = {}
    for key, token_id in specials.items():
        name_of_id.setdefault(token_id, _SPECIAL_NAMES[key])
    for token_id, name in sorted(name_of_id.items()):
        # added tokens take the next free ids: fill any gap before this one with unused placeholders
        while (n := tok.get_vocab_size(with_added_tokens=True)) < token_id:
            tok.add_special_tokens([AddedToken(f"<|unused{n}|>", special=True)])
        tok.add_special_tokens([AddedToken(name, special=True)])
    names = {key: name_of_id[token_id] for key, token_id in specials.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(
        config_json.get("n_positions") or config_json.get("max_position_embeddings") or 1024)}
    for key, name in names.items():
        tok_config[key.removesuffix("_id")] = name
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return path
