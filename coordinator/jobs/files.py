"""A job's files in the coordinator's state dir, and turning uploads into a runnable job.

Layout under ``state_dir/jobs/<job_id>/``::

    upload/data/...          text files as uploaded (the CLI's --data)
    upload/checkpoint/...    the starting checkpoint or config.json (the CLI's --model)
    init/                    the prepared model (config.json + model.safetensors + tokenizer)
    data.npy                 tokenised windows (num_samples, seq_len + 1)
    checkpoints/step-N/stage-S-rR/   copies of stage checkpoints sent by nodes
    result/                  the exported HF checkpoint of a finished job
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from swarm.errors import CapacityError, InvalidRequestError, NotFoundError
from swarm.model.checkpoint import load_checkpoint, save_checkpoint
from swarm.model.config import ModelConfig
from swarm.model.tokenizer import load_tokenizer
from swarm.pipeline.data import TokenDataset, read_texts, tokenize
from swarm.pipeline.job_model import init_tensors, untie

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
MAX_FILES = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadLimits:
    max_total_bytes: int = 8 << 30
    max_file_bytes: int = 4 << 30
    max_model_params: int = 2_000_000_000  # swarm-coordinator serve --max-model-params


def job_dir(state_dir: Path, job_id: str) -> Path:
    return Path(state_dir) / "jobs" / job_id


def safe_relative(name: str, *, allowed_roots: tuple[str, ...]) -> PurePosixPath:
    """A relative path under one of ``allowed_roots``; raises InvalidRequestError otherwise."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or any(part in ("", ".", "..") for part in p.parts) or "\\" in name:
        raise InvalidRequestError(f"file name {name!r} must be a plain relative path")
    if p.parts[0] not in allowed_roots or len(p.parts) < 2:
        raise InvalidRequestError(f"file {name!r} must live under one of {allowed_roots}")
    if len(name) > 1000:
        raise InvalidRequestError("file name longer than 1000 characters")
    return p


class FileReceiver:
    """Writes a stream of (header | data) items to files, checking sizes and SHA-256 digests.

    Call :meth:`start_file` for each FileHeader, :meth:`write` for its data, :meth:`finish` at the end.
    """

    def __init__(self, root: Path, *, roots: tuple[str, ...], limits: UploadLimits) -> None:
        self.root = Path(root)
        self.roots = roots
        self.limits = limits
        self.total_bytes = 0
        self.files: list[PurePosixPath] = []
        self._cur: tuple[PurePosixPath, int, str, object, object] | None = None  # name, size, sha, fh, hasher
        self._written = 0

    def start_file(self, name: str, size_bytes: int, sha256: str) -> None:
        self._close_current()
        rel = safe_relative(name, allowed_roots=self.roots)
        if rel in self.files:
            raise InvalidRequestError(f"file {name} sent twice")
        if len(self.files) >= MAX_FILES:
            raise InvalidRequestError(f"more than {MAX_FILES} files in one upload")
        if size_bytes < 0 or size_bytes > self.limits.max_file_bytes:
            raise CapacityError(f"file {name} is {size_bytes} bytes; the limit is {self.limits.max_file_bytes}")
        if self.total_bytes + size_bytes > self.limits.max_total_bytes:
            raise CapacityError(f"upload exceeds {self.limits.max_total_bytes} bytes in total; send less data")
        if len(sha256) != 64:
            raise InvalidRequestError(f"file {name} needs a hex SHA-256 digest")
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        self._cur = (rel, int(size_bytes), sha256.lower(), path.open("wb"), hashlib.sha256())
        self._written = 0
        self.files.append(rel)

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._cur is None:
            raise InvalidRequestError("file data arrived before its FileHeader")
        rel, size, _, fh, hasher = self._cur
        if self._written + len(data) > size:
            raise InvalidRequestError(f"file {rel} is longer than the {size} bytes announced")
        fh.write(data)
        hasher.update(data)
        self._written += len(data)
        self.total_bytes += len(data)

    def _close_current(self) -> None:
        if self._cur is None:
            return
        rel, size, sha, fh, hasher = self._cur
        fh.close()
        self._cur = None
        if self._written != size:
            raise InvalidRequestError(f"file {rel} has {self._written} bytes, {size} were announced")
        if hasher.hexdigest() != sha:
            raise InvalidRequestError(f"file {rel} failed its SHA-256 check; upload again")

    def finish(self) -> list[PurePosixPath]:
        self._close_current()
        return list(self.files)

    def abort(self) -> None:
        if self._cur is not None:
            self._cur[3].close()
            self._cur = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PreparedJob:
    config: ModelConfig  # untied
    dataset: TokenDataset


def prepare_job(jdir: Path, *, seq_len: int, seed: int, max_model_params: int | None = None) -> PreparedJob:
    """Build ``init/`` and ``data.npy`` from ``upload/``. Raises InvalidRequestError on bad input,
    including a config-only model larger than ``max_model_params`` (its weights are made here)."""
    ckpt = jdir / "upload" / "checkpoint"
    data = jdir / "upload" / "data"
    if not (ckpt / "config.json").is_file():
        raise InvalidRequestError("the upload has no checkpoint/config.json; pass --model CONFIG.json or a model directory")
    if not data.is_dir():
        raise InvalidRequestError("the upload has no data files; pass --data with a text file or directory")
    has_weights = any(ckpt.glob("*.safetensors"))
    if has_weights:
        loaded = load_checkpoint(ckpt)
        config, tensors = loaded.config, loaded.tensors
    else:
        from swarm.model.checkpoint import load_config

        config = load_config(ckpt)
        num_params = config.num_parameters()
        if max_model_params is not None and num_params > max_model_params:
            raise InvalidRequestError(
                f"config.json describes a model of {num_params:,} parameters ({num_params * 4 / 2**30:.1f} GiB in "
                f"float32); this coordinator allows at most {max_model_params:,} (swarm-coordinator serve "
                "--max-model-params): submit a smaller model")
        tensors = init_tensors(config, seed=seed)
    if seq_len > config.max_position_embeddings:
        raise InvalidRequestError(
            f"--seq-len {seq_len} exceeds the model's max_position_embeddings {config.max_position_embeddings}"
        )
    config, tensors = untie(config, tensors)
    init = jdir / "init"
    save_checkpoint(init, config, tensors)
    for name in TOKENIZER_FILES:
        if (ckpt / name).is_file():
            shutil.copyfile(ckpt / name, init / name)
    tok = load_tokenizer(init, vocab_size=config.vocab_size)
    dataset = tokenize(read_texts(data), encode=tok.encode, seq_len=seq_len, eos_id=tok.eos_token_id)
    if int(dataset.tokens.max()) >= config.vocab_size:
        raise InvalidRequestError(
            f"the tokenizer produced id {int(dataset.tokens.max())}, outside the model's vocabulary of {config.vocab_size}"
        )
    dataset.save(jdir / "data.npy")
    log.info("job prepared dir=%s samples=%d seq_len=%d", jdir, dataset.num_samples, seq_len)
    return PreparedJob(config=config, dataset=dataset)


def stage_weights_bytes(jdir: Path, first: int, last: int, *, is_first: bool, is_last: bool,
                        source: str = "init") -> bytes:
    """The stage's HF-named tensors from ``init/`` (or a ``resume-N/`` model) as one safetensors blob."""
    init = jdir / source
    if not init.is_dir():
        raise NotFoundError(f"this job has no model under {source}/")
    ckpt = load_checkpoint(init, range(first, last), is_first=is_first, is_last=is_last)
    return st_save({k: v.contiguous() for k, v in ckpt.tensors.items()})


def iter_file_chunks(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while True:
            block = fh.read(chunk_bytes)
            if not block:
                return
            yield block


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    for block in iter_file_chunks(path, 1 << 20):
        h.update(block)
    return h.hexdigest()


def checkpoint_dir(jdir: Path, *, step: int, stage: int, replica: int) -> Path:
    return jdir / "checkpoints" / f"step-{step:08d}" / f"stage-{stage}-r{replica}"


def assemble_result(jdir: Path, config: ModelConfig, stage_dirs: Iterable[Path], *, name: str = "result") -> Path:
    """Merge the stages' ``weights.safetensors`` into an HF checkpoint under ``name/`` (the final
    ``result/``, or ``resume-N/`` for a re-planned job)."""
    dicts = []
    for d in stage_dirs:
        f = Path(d) / "weights.safetensors"
        if not f.is_file():
            raise NotFoundError(f"stage checkpoint {d} has no weights.safetensors")
        dicts.append(st_load(f.read_bytes()))
    out = jdir / name
    if out.exists():
        shutil.rmtree(out)
    save_checkpoint(out, config, *dicts)
    for name in TOKENIZER_FILES:
        src = jdir / "init" / name
        if src.is_file():
            shutil.copyfile(src, out / name)
    log.info("job model assembled dir=%s", out)
    return out


def load_tensor_blob(blob: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(blob)
    except Exception as exc:  # safetensors raises its own error types on malformed input
        raise InvalidRequestError(f"not a safetensors blob: {exc}") from exc


