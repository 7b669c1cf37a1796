"""Moving one stage's weights: serve the tensors of a layer range, receive them into a directory.

The sender (coordinator with the whole checkpoint, or a peer holding the same layers) streams
``ServeShardChunk`` messages: the first carries ``config.json``; each tensor starts with a
piece naming it (dtype, shape, size, CRC-32) followed by pieces of at most 1 MiB. The receiver
checks every size before allocating and writes a stage-only HF checkpoint (config.json +
model.safetensors) that :func:`swarm.model.checkpoint.load_stage` reads.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from safetensors.torch import save_file

from swarm.errors import InvalidRequestError
from swarm.model.checkpoint import load_checkpoint
from swarm.model.config import ModelConfig
from swarm.proto.v1 import inference_pb2 as pb
from swarm.transport import tensors as wire
from swarm.transport.transfer import CHUNK_BYTES

MAX_CONFIG_CHARS = 1 << 20
MAX_TENSORS = 1 << 14
MAX_NAME_CHARS = 256
MAX_SHARD_BYTES = 256 << 30  # far above any one stage we serve; disk space is checked by the OS
WEIGHT_DTYPES = ("float32", "float16", "bfloat16")


def serve_shard(model_dir: Path, request: pb.ServeFetchShardRequest) -> Iterator[pb.ServeShardChunk]:
    """Messages carrying the tensors of ``[first_layer, last_layer_excl)`` (+ ends asked for)."""
    if not 0 <= request.first_layer <= request.last_layer_excl:
        raise InvalidRequestError("shard layer range is invalid")
    cfg_text = (Path(model_dir) / "config.json").read_text()
    ckpt = load_checkpoint(
        model_dir, range(request.first_layer, request.last_layer_excl),
        is_first=request.include_embeddings, is_last=request.include_head,
    )
    yield pb.ServeShardChunk(config_json=cfg_text)
    for name in sorted(ckpt.tensors):
        t = ckpt.tensors[name].contiguous()
        payload = wire.raw_encode(t)
        yield pb.ServeShardChunk(
            tensor_name=name,
            dtype=wire.dtype_name(t.dtype),
            shape=list(t.shape),
            tensor_bytes=len(payload),
            tensor_crc32=zlib.crc32(payload) & 0xFFFFFFFF,
            data=payload[:CHUNK_BYTES],
        )
        for start in range(CHUNK_BYTES, len(payload), CHUNK_BYTES):
            yield pb.ServeShardChunk(data=payload[start : start + CHUNK_BYTES])


def receive_shard(chunks: Iterable[pb.ServeShardChunk], shard_dir: Path) -> int:
    """Validate a shard stream and write it to ``shard_dir``; returns the tensor bytes received."""
    it = iter(chunks)
    first = next(it, None)
    if first is None or not first.config_json or len(first.config_json) > MAX_CONFIG_CHARS:
        raise InvalidRequestError("a shard stream starts with the model's config.json (at most 1 MiB)")
    try:
        ModelConfig.from_hf_config(json.loads(first.config_json))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise InvalidRequestError(f"shard config.json is invalid: {exc}") from exc
    tensors = {}
    total = 0
    cur: dict | None = None

    def finish() -> None:
        if cur is None:
            return
        if len(cur["buf"]) != cur["bytes"]:
            raise InvalidRequestError(f"tensor {cur['name']} is truncated: {len(cur['buf'])} of {cur['bytes']} bytes")
        if zlib.crc32(cur["buf"]) & 0xFFFFFFFF != cur["crc"]:
            raise InvalidRequestError(f"tensor {cur['name']} checksum mismatch: the transfer was corrupted")
        tensors[cur["name"]] = wire.raw_decode(bytes(cur["buf"]), shape=cur["shape"], dtype=cur["dtype"])

    for msg in it:
        if msg.tensor_name:
            finish()
            name, shape = msg.tensor_name, tuple(int(d) for d in msg.shape)
            if len(name) > MAX_NAME_CHARS or name in tensors or len(tensors) >= MAX_TENSORS:
                raise InvalidRequestError(f"shard tensor name {name[:80]!r} is too long, repeated or one too many")
            if msg.dtype not in WEIGHT_DTYPES or len(shape) > wire.MAX_NDIM or any(d < 0 for d in shape):
                raise InvalidRequestError(f"shard tensor {name} has an invalid dtype or shape")
            numel = 1
            for d in shape:
                numel *= d
            itemsize = 4 if msg.dtype == "float32" else 2
            if msg.tensor_bytes != numel * itemsize:
                raise InvalidRequestError(f"shard tensor {name}: {msg.tensor_bytes} bytes do not match its shape")
            total += msg.tensor_bytes
            if total > MAX_SHARD_BYTES:
                raise InvalidRequestError("shard is larger than any stage may be")
            cur = {"name": name, "shape": shape, "dtype": msg.dtype, "bytes": msg.tensor_bytes,
                   "crc": msg.tensor_crc32, "buf": bytearray()}
        elif cur is None:
            raise InvalidRequestError("shard data arrived before any tensor header")
        if len(cur["buf"]) + len(msg.data) > cur["bytes"]:
            raise InvalidRequestError(f"tensor {cur['name']} has more bytes than announced")
        cur["buf"] += msg.data
    finish()
    if not tensors:
        raise InvalidRequestError("the shard stream carried no tensors")
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    tmp = shard_dir / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(shard_dir / "model.safetensors")
    (shard_dir / "config.json").write_text(first.config_json)
    return total
