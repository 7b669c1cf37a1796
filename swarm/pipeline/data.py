"""Training data: text files -> fixed-length token windows with stable sample ids, and the order
in which steps, replicas and micro-batches visit them.

Sample ``i`` is the ``i``-th window of the tokenised corpus and keeps that id in every epoch
(AQ-SGD keys its per-sample activation cache by it). The dataset's ``key`` is a content hash of
the token array, so a cache built for one tokenisation is never reused for another.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swarm.errors import InvalidRequestError

MAX_TEXT_BYTES = 1 << 30  # 1 GiB of text is far beyond what one job of ours tokenises


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenDataset:
    """``tokens[i]`` holds ``seq_len + 1`` token ids: inputs are ``[:-1]``, labels ``[1:]``."""

    tokens: np.ndarray  # (num_samples, seq_len + 1) int64
    key: str

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.shape[0] == 0 or self.tokens.shape[1] < 2:
            raise InvalidRequestError(
                f"a token dataset needs at least one window of 2+ tokens, got shape {self.tokens.shape}"
            )

    @property
    def num_samples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1] - 1)

    def inputs(self, sample_ids: Sequence[int]) -> np.ndarray:
        return self.tokens[np.asarray(sample_ids, dtype=np.int64), :-1]  # (b, S)

    def labels(self, sample_ids: Sequence[int]) -> np.ndarray:
        return self.tokens[np.asarray(sample_ids, dtype=np.int64), 1:]  # (b, S)

    def save(self, path: Path) -> None:
        np.save(path, self.tokens, allow_pickle=False)

    @classmethod
    def load(cls, path: Path) -> "TokenDataset":
        try:
            tokens = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InvalidRequestError(f"{path} is not a token array saved by swarm: {exc}") from exc
        if tokens.dtype.kind not in "iu":
            raise InvalidRequestError(f"{path} holds {tokens.dtype}, expected integer token ids")
        tokens = tokens.astype(np.int64, copy=False)
        return cls(tokens=tokens, key=content_key(tokens))


def content_key(tokens: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(repr(tokens.shape).encode())
    h.update(np.ascontiguousarray(tokens.astype(np.int64, copy=False)).tobytes())
    return h.hexdigest()[:32]


def read_texts(path: Path) -> list[str]:
    """The texts of a file, or of every regular file under a directory (sorted by path).

    Raises InvalidRequestError when the path is missing, holds no text, or is too large.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidRequestError(f"data path {path} does not exist; pass a text file or a directory of text files")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise InvalidRequestError(f"data directory {path} holds no files")
    total = sum(f.stat().st_size for f in files)
    if total > MAX_TEXT_BYTES:
        raise InvalidRequestError(f"data under {path} is {total} bytes, over the {MAX_TEXT_BYTES}-byte limit")
    texts = [decode_text(f.read_bytes(), f) for f in files]
    if not any(t.strip() for t in texts):
        what = files[0] if len(files) == 1 else path
        raise InvalidRequestError(f"{what} holds no text (empty or only whitespace); pass a text file with content")
    return texts


# A text file may carry a few bad bytes (a stray Latin-1 character): up to this fraction of the
# characters may be undecodable UTF-8 (they become U+FFFD); more means it is not text.
MAX_INVALID_UTF8_FRACTION = 0.01


def decode_text(raw: bytes, name: str | Path) -> str:
    """``raw`` as UTF-8 text. Raises InvalidRequestError naming ``name`` for a binary file: any
    NUL byte, or more than 1% of the characters in invalid UTF-8."""
    if b"\x00" in raw:
        raise InvalidRequestError(f"{name} is not text (it holds NUL bytes: a binary file?); "
                                  "pass UTF-8 text files as --data")
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())  # minus genuine U+FFFD characters
    if bad > MAX_INVALID_UTF8_FRACTION * max(len(text), 1):
        raise InvalidRequestError(f"{name} is not UTF-8 text ({bad} of {len(text)} characters do not decode); "
                                  "pass UTF-8 text files as --data (convert with iconv -t UTF-8)")
    return text


def tokenize(
    texts: Sequence[str], *, encode: Callable[[str], list[int]], seq_len: int, eos_id: int | None
) -> TokenDataset:
    """Concatenate the texts (separated by ``eos_id`` when given) and cut windows of ``seq_len + 1``.

    Consecutive windows overlap by one token so every token is a label exactly once.
    Raises InvalidRequestError when the corpus is shorter than one window.
    """
    if seq_len < 1:
        raise InvalidRequestError(f"seq_len must be positive, got {seq_len}")
    stream: list[int] = []
    for text in texts:
        stream.extend(encode(text))
        if eos_id is not None:
            stream.append(int(eos_id))
    num = (len(stream) - 1) // seq_len
    if num < 1:
        raise InvalidRequestError(
            f"the data has {len(stream)} tokens, fewer than one window of {seq_len + 1}; add text or lower --seq-len"
        )
    arr = np.asarray(stream[: num * seq_len + 1], dtype=np.int64)
    idx = np.arange(num)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    tokens = arr[idx]  # (num, seq_len + 1)
    return TokenDataset(tokens=tokens, key=content_key(tokens))


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchOrder:
    """Which samples every step, replica and micro-batch sees.

    Samples are visited epoch by epoch in a permutation seeded by ``(seed, epoch)``; an epoch is
    ``num_samples // batch_size`` whole batches (the remainder waits for a later epoch's
    permutation), so a step never holds a sample twice (AQ-SGD keys its state by sample id).
    Replica ``r`` of ``num_replicas`` takes its contiguous share of the step's batch, cut into
    micro-batches of ``micro_batch_size``.
    """

    num_samples: int
    batch_size: int
    micro_batch_size: int
    num_replicas: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise InvalidRequestError("the dataset is empty")
        if self.batch_size < 1 or self.micro_batch_size < 1 or self.num_replicas < 1:
            raise InvalidRequestError("batch size, micro-batch size and replicas must be positive")
        if self.batch_size > self.num_samples:
            raise InvalidRequestError(
                f"batch size {self.batch_size} exceeds the {self.num_samples} samples of the data; "
                "add data, lower --batch-size or --seq-len"
            )
        per_replica, rem = divmod(self.batch_size, self.num_replicas)
        if rem or per_replica % self.micro_batch_size:
            raise InvalidRequestError(
                f"batch size {self.batch_size} must split into {self.num_replicas} replica(s) of whole "
                f"micro-batches of {self.micro_batch_size}; change --batch-size or --micro-batch-size"
            )

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per step per replica."""
        return self.batch_size // self.num_replicas // self.micro_batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.steps_per_epoch))

    def epoch_of_step(self, step: int) -> float:
        return step / self.steps_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def step_samples(self, step: int) -> np.ndarray:
        """Sample ids of the whole batch of ``step`` (0-based), all replicas together."""
        if step < 0:
            raise InvalidRequestError(f"step must be non-negative, got {step}")
        epoch, index = divmod(step, self.steps_per_epoch)
        start = index * self.batch_size
        return self._permutation(epoch)[start : start + self.batch_size].astype(np.int64)

    def micro_batches(self, step: int, replica: int) -> list[np.ndarray]:
        """The sample ids of each micro-batch of ``replica`` in ``step``."""
        if not 0 <= replica < self.num_replicas:
            raise InvalidRequestError(f"replica {replica} out of range 0..{self.num_replicas - 1}")
        share = self.batch_size // self.num_replicas
        mine = self.step_samples(step)[replica * share : (replica + 1) * share]
        b = self.micro_batch_size
        return [mine[i : i + b] for i in range(0, share, b)]
