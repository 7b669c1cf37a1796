"""Tokenizers from a model directory: ``tokenizer.json`` via `tokenizers`, else raw UTF-8 bytes."""

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
