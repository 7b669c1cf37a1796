"""A job's files in the coordinator's state dir, and turning uploads into a runnable job.

Layout under ``state_dir/jobs/<job_id>/``::

    upload/data/...          text files as uploaded (the CLI's --data)
    upload/checkpoint/...    the starting checkpoint or config.json (the CLI's --model)
    init/                    the prepared model (config.json + model.safetensors + tokenizer)
    data.npy                 tokenised windows (num_samples, seq_len + 1)
    checkpoints/step-N/stage-S-rR/   copies of stage checkpoints sent by nodes (weights.safetensors,
                             optimizer.safetensors: AdamW state by HF name, meta.json)
    resume-N/                the model at step N (HF checkpoint) + optimizer.safetensors: where a
                             re-planned or `--resume`d job starts, and what `swarm job --download` sends
    result/                  the exported HF checkpoint of a finished job
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from swarm.errors import InvalidRequestError, NotFoundError, shown_as
from swarm.model.checkpoint import load_checkpoint, save_checkpoint
from swarm.model.config import ModelConfig
from swarm.model.tokenizer import load_tokenizer, save_byte_tokenizer
from swarm.pipeline.data import TokenDataset, read_texts, tokenize
from swarm.pipeline.job_model import init_tensors, untie
from swarm.transport.transfer import TransferLimits

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadLimits(TransferLimits):
    """How much one job upload may carry (the defaults of :class:`TransferLimits` for jobs)."""

    max_total_bytes: int = 8 << 30
    max_file_bytes: int = 4 << 30
    max_model_params: int = 2_000_000_000  # swarm-coordinator serve --max-model-params


def job_dir(state_dir: Path, job_id: str) -> Path:
    return Path(state_dir) / "jobs" / job_id


@dataclass(frozen=True, slots=True, kw_only=True)
class PreparedJob:
    config: ModelConfig  # untied
    dataset: TokenDataset


def _names_as_uploaded(fn):
    """Errors name the user's files as uploaded (``data/corpus.txt``), not this server's paths."""
    @functools.wraps(fn)
    def wrapper(jdir: Path, *args, **kwargs):
        with shown_as(Path(jdir) / "upload"):
            return fn(jdir, *args, **kwargs)
    return wrapper


@_names_as_uploaded
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
    if not (init / "tokenizer.json").is_file():
        # no tokenizer given: the byte-level one, written out so the trained model carries it
        # (refused here, at submit, when vocab_size does not fit it)
        save_byte_tokenizer(init, config.to_hf_config())
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


OPTIMIZER_FILE = "optimizer.safetensors"


def assemble_resume(jdir: Path, config: ModelConfig, stage_dirs: list[Path], *, step: int) -> tuple[Path, bool]:
    """``resume-{step}/``: the stages' weights as one HF checkpoint plus, when every stage sent
    its optimizer state, the merged ``optimizer.safetensors``. Returns (dir, has optimizer state)."""
    out = assemble_result(jdir, config, stage_dirs, name=f"resume-{step}")
    optim = [Path(d) / OPTIMIZER_FILE for d in stage_dirs]
    if not all(f.is_file() for f in optim):
        log.warning("checkpoint at step %d lacks optimizer state for some stage; AdamW restarts dir=%s", step, jdir)
        return out, False
    merged: dict[str, torch.Tensor] = {}
    for f in optim:
        merged.update(st_load(f.read_bytes()))  # disjoint HF names; adamw.step is the same everywhere
    (out / OPTIMIZER_FILE).write_bytes(st_save(merged))
    return out, True


def stage_optimizer_bytes(jdir: Path, config: ModelConfig, first: int, last: int, *, is_first: bool, is_last: bool,
                          source: str) -> bytes:
    """The AdamW state of a stage's parameters from ``source/optimizer.safetensors`` as one
    safetensors blob. Raises NotFoundError when the source has none."""
    from safetensors import safe_open

    from swarm.model.hf_names import needed_hf_names
    from swarm.pipeline.optim_state import STEP_KEY, param_name

    f = jdir / source / OPTIMIZER_FILE
    if not f.is_file():
        raise NotFoundError(f"this job has no optimizer state under {source}/")
    with safe_open(str(f), framework="pt") as sf:
        keys = list(sf.keys())
        names = sorted({n for k in keys if (n := param_name(k)) is not None})
        want = set(needed_hf_names(config, names, first, last, is_first=is_first, is_last=is_last))
        out = {k: sf.get_tensor(k) for k in keys if k == STEP_KEY or param_name(k) in want}
    return st_save(out)


def download_files(model_dir: Path) -> list[Path]:
    """The HF checkpoint files of ``result/`` or ``resume-N/`` (not the optimizer state)."""
    return sorted(p for p in model_dir.iterdir() if p.is_file() and p.name != OPTIMIZER_FILE)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` where the file system allows, else copy (job files are never
    modified in place, so jobs may share them)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """:func:`link_or_copy` for every file of the tree ``src``."""
    shutil.copytree(src, dst, copy_function=lambda a, b: link_or_copy(Path(a), Path(b)))
