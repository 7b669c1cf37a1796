"""A training job's spec: what ``swarm train`` asks for, parsed once into a typed object.

Built where the user's input enters (``swarm train``, the README demo, benches and tests), sent
as the protobuf ``JobSpec`` (:mod:`swarm.transport.jobs` converts, field by field), stored by the
coordinator as :meth:`JobSpec.to_json` and read by attribute everywhere: the planner prices the
codec's two directions from ``spec.codec``, the node's stage worker builds its boundary codecs
from it. Each default is defined once, here.

The JSON form (:meth:`to_dict`) uses the protobuf field names, with the codec as its canonical
text (``"compression": "aqsgd:fw=2,bw=4"``); it is what ``swarm job ID --json`` and
``/api/jobs/{id}`` show under ``"spec"``, and what the coordinator's SQLite file holds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from swarm.compression.spec import CodecSpec
from swarm.errors import ConfigError, InvalidRequestError
from swarm.job_defaults import DEFAULT_CHECKPOINT_EVERY, DEFAULT_VERIFY_PROB  # re-exported: defined torch-free there for the CLI

MAX_STEPS = 10_000_000
SCHEDULES = ("1f1b", "gpipe")

_INT_FIELDS = ("steps", "batch_size", "micro_batch_size", "seq_len", "checkpoint_every", "seed", "warmup_steps",
               "num_stages", "num_replicas")
_FLOAT_FIELDS = ("epochs", "lr", "weight_decay", "grad_clip", "peer_timeout_s", "min_lr_ratio", "node_wait_s",
                 "verify_prob")
_OPTIONAL_KEYS = frozenset({"node_wait_s", "verify_prob"})  # see JobSpec.to_dict
CODEC_KEY = "compression"  # the codec's name in the protobuf message and in the JSON form


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """A validated training job spec. Raises InvalidRequestError naming the flag to fix.

    ``steps`` optimizer steps, or 0 to derive them from ``epochs`` passes over the data (both 0:
    one epoch). ``batch_size`` sequences per step over all replicas, split into micro-batches of
    ``micro_batch_size``; ``seq_len`` tokens per sequence. ``codec``: how pipeline boundaries
    compress activations and gradients. ``num_stages``/``num_replicas`` 0: the planner chooses.
    ``checkpoint_every`` 0: checkpoint only at the end; the default, :data:`DEFAULT_CHECKPOINT_EVERY`,
    is short because checkpoints are asynchronous and kept twice (docs/training.md, "Checkpoints").
    ``grad_clip`` 0: no clipping.
    """

    name: str = ""
    steps: int = 0
    epochs: float = 0.0
    batch_size: int = 8
    micro_batch_size: int = 2
    seq_len: int = 64
    lr: float = 3e-4
    codec: CodecSpec = field(default=CodecSpec(kind="none"))
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    seed: int = 0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    schedule: str = "1f1b"
    num_stages: int = 0
    num_replicas: int = 0
    peer_timeout_s: float = 30.0
    min_lr_ratio: float = 0.1
    # A job that lost a stage no idle node can replace waits this long (pending, with the reason)
    # for one to come back or join, then fails; 0 fails it at once.
    node_wait_s: float = 3600.0
    verify_prob: float = DEFAULT_VERIFY_PROB  # 0 = no spot checks

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not isinstance(self.schedule, str):
            raise InvalidRequestError("job name and schedule must be strings")
        if not isinstance(self.codec, CodecSpec):
            raise InvalidRequestError(f"job codec must be a CodecSpec, got {type(self.codec).__name__}; "
                                      "parse it with CodecSpec.parse")
        for k in _INT_FIELDS:
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int):
                raise InvalidRequestError(f"job {k} must be an integer, got {v!r}")
        for k in _FLOAT_FIELDS:
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InvalidRequestError(f"job {k} must be a number, got {v!r}")
            object.__setattr__(self, k, float(v))
            if not math.isfinite(getattr(self, k)):
                raise InvalidRequestError(f"job {k} must be finite")
        if self.steps < 0 or self.steps > MAX_STEPS or self.epochs < 0:
            raise InvalidRequestError("--steps and --epochs must be non-negative")
        if self.steps == 0 and self.epochs == 0:
            object.__setattr__(self, "epochs", 1.0)
        if self.batch_size < 1 or self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise InvalidRequestError("--batch-size must be a positive multiple of --micro-batch-size")
        if not 1 <= self.seq_len <= 1 << 16:
            raise InvalidRequestError("--seq-len must be in 1..65536")
        if not 0 < self.lr < 10:
            raise InvalidRequestError("--lr must be in (0, 10)")
        if self.schedule not in SCHEDULES:
            raise InvalidRequestError("schedule must be 1f1b or gpipe")
        if not 0.5 <= self.peer_timeout_s <= 3600:
            raise InvalidRequestError("peer timeout must be in 0.5..3600 s")
        if not 0 <= self.node_wait_s <= 30 * 86400:
            raise InvalidRequestError("--node-wait-s must be in 0..2592000 s")
        if not 0.0 <= self.verify_prob <= 1.0:
            raise InvalidRequestError("--verify-prob must be in 0..1")
        if self.checkpoint_every < 0 or self.num_stages < 0 or self.num_replicas < 0:
            raise InvalidRequestError("--checkpoint-every, stages and replicas must be non-negative")

    def replace(self, **changes: Any) -> JobSpec:
        return dataclasses.replace(self, **changes)

    def micro_batches(self, pipelines: int) -> int:
        """Micro-batches per step of each of ``pipelines`` data-parallel pipelines (what a
        worker's BatchOrder.num_micro_batches gives: swarm/pipeline/data.py)."""
        return self.batch_size // pipelines // self.micro_batch_size

    # -- the JSON form ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form: protobuf field names, the codec as its canonical text. Fields added
        after the JSON form was fixed (:data:`_OPTIONAL_KEYS`) appear only when they differ from
        their defaults, so stored rows and scripts keep seeing the keys they know."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in _OPTIONAL_KEYS and v == f.default:
                continue
            if f.name == "codec":
                out[CODEC_KEY] = str(v)
            else:
                out[f.name] = v
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> JobSpec:
        """From the JSON form (or a dict of protobuf field values): unknown keys are ignored,
        missing, None or empty-string values take the default. Raises InvalidRequestError."""
        if not isinstance(raw, dict):
            raise InvalidRequestError(f"a job spec must be a JSON object, got {type(raw).__name__}")
        given = {k: v for k, v in raw.items() if v is not None and v != ""}
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = CODEC_KEY if f.name == "codec" else f.name
            if key not in given:
                continue
            v = given[key]
            try:
                if f.name == "codec":
                    kw["codec"] = v if isinstance(v, CodecSpec) else CodecSpec.parse(str(v))
                elif f.name in _INT_FIELDS:
                    kw[f.name] = int(v)
                elif f.name in _FLOAT_FIELDS:
                    kw[f.name] = float(v)
                else:
                    kw[f.name] = str(v)
            except ConfigError as exc:
                raise ConfigError(f"--compression: {exc}") from None
            except (TypeError, ValueError, OverflowError):
                raise InvalidRequestError(f"job {f.name} must be a number, got {v!r}") from None
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        """Parse :meth:`to_json` output (or the plain dict older coordinators stored, which uses the
        same keys). Raises InvalidRequestError."""
        try:
            raw = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise InvalidRequestError(f"job spec is not valid JSON: {exc}") from None
        return cls.from_dict(raw)
