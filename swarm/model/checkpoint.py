"""HF-format checkpoints in a local directory: ``config.json`` + ``*.safetensors`` (sharded too).

Loading reads only the tensors a stage needs (safetensors opens files lazily), so a node holding
layers 12-15 of a large model never reads the rest. Saving writes HF tensor names, so
``transformers`` loads the result.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from swarm.errors import ConfigError, InvalidRequestError, NotFoundError
from swarm.model.config import ModelConfig
from swarm.model.hf_names import layer_of, needed_hf_names
from swarm.model.stage import StageModel

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """Tensors (HF names) read from a checkpoint directory, with the model config."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def load_config(path: str | Path) -> ModelConfig:
    """Read ``config.json`` of a checkpoint directory. Raises NotFoundError / ConfigError."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise NotFoundError(f"no config.json in {path}; point at an HF-format model directory")
    try:
        hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or not UTF-8
        raise ConfigError(f"cannot read {cfg_path}: it is not a JSON file ({exc}); pass an HF config.json") from exc
    if not isinstance(hf, dict):
        raise ConfigError(f"{cfg_path} holds a JSON {type(hf).__name__}, not an object; pass an HF config.json")
    try:
        return ModelConfig.from_hf_config(hf)
    except (TypeError, ValueError, KeyError) as exc:  # wrongly typed fields
        raise ConfigError(f"{cfg_path} is not a usable model config ({type(exc).__name__}: {exc})") from exc


@contextmanager
def _open_safetensors(f: Path):
    """``safe_open`` that reports a corrupt or truncated file as InvalidRequestError naming it."""
    try:
        sf = safe_open(str(f), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) on bad files
        raise InvalidRequestError(
            f"{f} is not a valid safetensors file ({exc}); re-save the checkpoint "
            "(save_pretrained / safetensors.torch.save_file) or copy it again") from exc
    with sf:
        yield sf


def check_weights(path: str | Path) -> int:
    """Open the header of every ``*.safetensors`` file of a checkpoint directory; the number of
    tensors. Raises InvalidRequestError naming a corrupt file, NotFoundError when there is none."""
    return len(_weight_map(Path(path)))


def _weight_map(path: Path) -> dict[str, str]:
    """tensor name -> file name, from the shard index or the single file."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        except (OSError, ValueError, RecursionError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read the shard index {index}: {exc}") from exc
    single = path / SINGLE_NAME
    files = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise NotFoundError(f"no *.safetensors in {path}; only safetensors checkpoints are supported")
    out = {}
    for f in files:
        with _open_safetensors(f) as sf:
            for name in sf.keys():
                out[name] = f.name
    return out


def _canonical_name(config: ModelConfig, name: str) -> str:
    """Checkpoints saved from a bare ``GPT2Model``/``LlamaModel`` (e.g. the original GPT-2 release)
    lack the ``transformer.``/``model.`` prefix; name their tensors as the LM-head model does."""
    prefix = "transformer." if config.family == "gpt2" else "model."
    if name.startswith(prefix) or name.startswith("lm_head."):
        return name
    return prefix + name


def load_checkpoint(
    path: str | Path,
    layers: range | None = None,
    *,
    is_first: bool | None = None,
    is_last: bool | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Checkpoint:
    """Read the tensors of ``layers`` (all layers when None) plus the ends that range owns.

    ``is_first``/``is_last`` default to whether ``layers`` starts at 0 / ends at the last layer;
    the first stage gets the embeddings, the last the final norm and LM head (the embedding
    matrix when the head is tied). Floating tensors are cast to ``dtype`` when given.
    """
    path = Path(path)
    config = load_config(path)
    if layers is None:
        layers = range(config.num_layers)
    if layers.step != 1 or not 0 <= layers.start <= layers.stop <= config.num_layers:
        raise InvalidRequestError(f"layers {layers} is not a contiguous range inside 0..{config.num_layers}")
    first = layers.start == 0 if is_first is None else is_first
    last = layers.stop == config.num_layers if is_last is None else is_last
    stored = _weight_map(path)
    canonical = {_canonical_name(config, n): n for n in stored}  # canonical -> name in the file
    names = needed_hf_names(config, list(canonical), layers.start, layers.stop, is_first=first, is_last=last)
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(stored[canonical[n]], []).append(n)
    tensors: dict[str, torch.Tensor] = {}
    for fname, fnames in sorted(by_file.items()):
        fpath = path / fname
        if not fpath.is_file():
            raise NotFoundError(f"shard {fname} named in {INDEX_NAME} is missing from {path}")
        with _open_safetensors(fpath) as sf:
            for n in fnames:
                try:
                    t = sf.get_tensor(canonical[n])
                except Exception as exc:  # a truncated file fails only when the tensor is read
                    raise InvalidRequestError(f"{fpath}: cannot read tensor {canonical[n]} ({exc}); "
                                              "the file is corrupt or truncated: copy it again") from exc
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                tensors[n] = t.to(device)
    log.debug("loaded checkpoint path=%s layers=%s tensors=%d", path, layers, len(tensors))
    return Checkpoint(config=config, tensors=tensors)


def load_stage(
    path: str | Path,
    first_layer: int,
    last_layer: int,
    *,
    is_first: bool | None = None,
    is_last: bool | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> StageModel:
    """Build the stage ``[first_layer, last_layer)`` and fill it from a checkpoint directory."""
    ckpt = load_checkpoint(path, range(first_layer, last_layer), is_first=is_first, is_last=is_last, device="cpu", dtype=dtype)
    first = first_layer == 0 if is_first is None else is_first
    last = last_layer == ckpt.config.num_layers if is_last is None else is_last
    stage = StageModel(ckpt.config, first_layer, last_layer, is_first=first, is_last=last).to(dtype=dtype)
    stage.load_hf_state(ckpt.tensors)
    return stage.to(device)


def save_checkpoint(
    path: str | Path,
    config: ModelConfig,
    *state_dicts: dict[str, torch.Tensor],
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Write ``config.json`` and safetensors from HF-named state dicts (e.g. every stage's
    :meth:`StageModel.hf_state_dict`), sharded with an index when larger than ``max_shard_bytes``.

    Returns the files written. Raises InvalidRequestError when two dicts disagree on a tensor or
    the merged dicts miss a layer.
    """
    path = Path(path)
    merged: dict[str, torch.Tensor] = {}
    for sd in state_dicts:
        for name, t in sd.items():
            t = t.detach().to("cpu")
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            if name in merged and not torch.equal(merged[name], t):
                raise InvalidRequestError(f"two state dicts hold different values for {name}; export from one copy")
            merged[name] = t.contiguous().clone()
    if config.tie_word_embeddings:
        merged.pop("lm_head.weight", None)
    # completeness: every layer must appear
    present = {layer_of(config, n) for n in merged}
    missing = [i for i in range(config.num_layers) if i not in present]
    if missing:
        raise InvalidRequestError(f"cannot save: no tensors for layers {missing}; pass every stage's state dict")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2) + "\n")
    names = sorted(merged)
    total = sum(merged[n].numel() * merged[n].element_size() for n in names)
    meta = {"format": "pt"}
    if max_shard_bytes is None or total <= max_shard_bytes:
        (path / INDEX_NAME).unlink(missing_ok=True)
        save_file({n: merged[n] for n in names}, str(path / SINGLE_NAME), metadata=meta)
        return [path / "config.json", path / SINGLE_NAME]
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nb = merged[n].numel() * merged[n].element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nb
    written = [path / "config.json"]
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: merged[n] for n in shard}, str(path / fname), metadata=meta)
        weight_map.update({n: fname for n in shard})
        written.append(path / fname)
    (path / SINGLE_NAME).unlink(missing_ok=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    written.append(path / INDEX_NAME)
    return written
