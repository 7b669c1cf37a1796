"""Codec specs: how a pipeline boundary compresses activations (forward) and gradients (backward).

Grammar: ``none`` | ``direct:OPTS`` | ``aqsgd:OPTS`` with OPTS a comma list of ``key=value``:

==========  ===============================================================  ==========
key         meaning                                                           default
==========  ===============================================================  ==========
fw          forward bits 2..8 (direct: of the activation; aqsgd: of its       4
            change since the sample's last visit)
bw          backward bits 2..8, or ``raw`` for uncompressed gradients         8
g           values per quantization group (multiple of 8), or ``channel``    128
            for one scale per channel of the last dimension (hidden unit)
fwround     forward rounding: ``rtn`` (nearest) or ``sr`` (stochastic)       rtn
bwround     backward rounding: ``rtn`` or ``sr``                             sr
ef          backward error feedback per sample (1/0): the gradient sender     0
            adds the sample's last quantization residual before quantizing
first       aqsgd first visit of a sample: ``raw`` or bits 2..8 (direct)     raw
seed        seed of the stochastic rounding generator                         0
==========  ===============================================================  ==========

Wire size (what the planner prices): a quantized value costs ``bits / 8`` bytes of packed codes
plus, per group, a (lo, scale) pair of bfloat16 = 4 bytes (wire.py); a raw value costs its dtype's
size (float32 from the stage workers: 4 bytes). :meth:`CodecSpec.forward_bytes_per_value` and
:meth:`CodecSpec.backward_bytes_per_value` give the payload bytes per value; the fixed headers of
a message (``SWC1`` 20 bytes + 9 per sample + 8, and per tensor part ``SWT1`` 20 bytes + 4 per
dimension) are not included: a few hundred bytes per micro-batch, next to megabytes of payload.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from swarm.errors import ConfigError

KINDS = ("none", "direct", "aqsgd")
ROUNDINGS = ("rtn", "sr")
RAW_BYTES_PER_VALUE = 4.0  # stage workers send float32 activations and gradients uncompressed
SCALE_BYTES_PER_GROUP = 4  # lo and scale, one bfloat16 each (wire.py)


@dataclass(frozen=True, slots=True, kw_only=True)
class CodecSpec:
    """A parsed codec spec. ``bw_bits``/``first_bits`` of None mean uncompressed (raw)."""

    kind: str
    fw_bits: int | None = 4
    bw_bits: int | None = 8
    group_size: int = 128
    per_channel: bool = False
    fw_stochastic: bool = False
    bw_stochastic: bool = True
    error_feedback: bool = False
    first_bits: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"codec kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "none":
            object.__setattr__(self, "fw_bits", None)
            object.__setattr__(self, "bw_bits", None)
            object.__setattr__(self, "error_feedback", False)
            object.__setattr__(self, "first_bits", None)
        else:
            _check_bits("fw", self.fw_bits, allow_raw=False)
            _check_bits("bw", self.bw_bits, allow_raw=True)
            _check_bits("first", self.first_bits, allow_raw=True)
        if self.group_size % 8 or not 8 <= self.group_size <= 1 << 20:
            raise ConfigError(f"codec group size g={self.group_size} must be a multiple of 8 in 8..{1 << 20}")
        if self.error_feedback and self.bw_bits is None:
            raise ConfigError("error feedback (ef=1) needs compressed gradients: set bw to 2..8")
        if self.seed < 0:
            raise ConfigError(f"codec seed must be >= 0, got {self.seed}")

    @classmethod
    def parse(cls, text: str) -> "CodecSpec":
        """Parse ``none``, ``direct:fw=4,bw=8``, ``aqsgd:fw=3,bw=6,g=64`` ... Raises ConfigError."""
        text = text.strip()
        kind, _, rest = text.partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise ConfigError(f"codec spec {text!r}: kind must be one of {KINDS} (e.g. 'aqsgd:fw=3,bw=6')")
        fields: dict = {"kind": kind}
        if rest.strip():
            if kind == "none":
                raise ConfigError(f"codec spec {text!r}: 'none' takes no options")
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                key, value = key.strip().lower(), value.strip().lower()
                if not eq or not value:
                    raise ConfigError(f"codec spec {text!r}: option {item!r} must be key=value")
                try:
                    if key == "fw":
                        fields["fw_bits"] = int(value)
                    elif key in ("bw", "first"):
                        fields["bw_bits" if key == "bw" else "first_bits"] = None if value == "raw" else int(value)
                    elif key == "g":
                        if value == "channel":
                            fields["per_channel"] = True
                        else:
                            fields["group_size"] = int(value)
                    elif key in ("fwround", "bwround"):
                        if value not in ROUNDINGS:
                            raise ConfigError(f"codec spec {text!r}: {key} must be one of {ROUNDINGS}")
                        fields["fw_stochastic" if key == "fwround" else "bw_stochastic"] = value == "sr"
                    elif key == "ef":
                        if value not in ("0", "1"):
                            raise ConfigError(f"codec spec {text!r}: ef must be 0 or 1")
                        fields["error_feedback"] = value == "1"
                    elif key == "seed":
                        fields["seed"] = int(value)
                    else:
                        raise ConfigError(
                            f"codec spec {text!r}: unknown option {key!r}; use fw, bw, g, fwround, bwround, ef, first, seed"
                        )
                except ValueError as exc:
                    raise ConfigError(f"codec spec {text!r}: {key}={value} is not a number") from exc
        return cls(**fields)

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        parts = [f"fw={self.fw_bits}", f"bw={self.bw_bits if self.bw_bits is not None else 'raw'}"]
        default = CodecSpec(kind=self.kind)
        if self.per_channel:
            parts.append("g=channel")
        elif self.group_size != default.group_size:
            parts.append(f"g={self.group_size}")
        if self.fw_stochastic != default.fw_stochastic:
            parts.append(f"fwround={'sr' if self.fw_stochastic else 'rtn'}")
        if self.bw_stochastic != default.bw_stochastic:
            parts.append(f"bwround={'sr' if self.bw_stochastic else 'rtn'}")
        if self.error_feedback:
            parts.append("ef=1")
        if self.kind == "aqsgd" and self.first_bits is not None:
            parts.append(f"first={self.first_bits}")
        if self.seed:
            parts.append(f"seed={self.seed}")
        return f"{self.kind}:" + ",".join(parts)

    def replace(self, **changes) -> "CodecSpec":
        return dataclasses.replace(self, **changes)

    @property
    def needs_activation_state(self) -> bool:
        return self.kind == "aqsgd"

    # -- wire size ----------------------------------------------------------------------------
    def forward_bytes_per_value(self, *, steady: bool = True, raw_bytes: float = RAW_BYTES_PER_VALUE,
                                rows: float | None = None) -> float:
        """Payload bytes per activation value sent forward, scales included, headers not.

        ``steady``: for ``aqsgd``, a sample's later visits (its change since the last visit at
        ``fw`` bits) -- every visit after the first epoch, so the planner prices a job by them;
        ``steady=False`` gives a first visit (raw, or ``first`` bits). ``none``/``direct`` send
        every visit the same way. ``raw_bytes``: size of an uncompressed value (float32 = 4 from
        the stage workers; 2 for a model trained in fp16). ``rows``: values per channel (micro-
        batch x sequence length), needed with ``g=channel`` to amortise its per-channel scales.
        """
        if self.kind == "none":
            return float(raw_bytes)
        bits = self.fw_bits if (self.kind == "direct" or steady) else self.first_bits
        return self._bytes(bits, raw_bytes, rows)

    def backward_bytes_per_value(self, *, raw_bytes: float = RAW_BYTES_PER_VALUE, rows: float | None = None) -> float:
        """Payload bytes per gradient value sent backward (``bw`` bits, or raw), scales included;
        see :meth:`forward_bytes_per_value` for ``raw_bytes`` and ``rows``."""
        if self.kind == "none":
            return float(raw_bytes)
        return self._bytes(self.bw_bits, raw_bytes, rows)

    def _bytes(self, bits: int | None, raw_bytes: float, rows: float | None) -> float:
        if bits is None:
            return float(raw_bytes)
        if not self.per_channel:
            # exact when a message holds whole groups (the last partial group is padded to a full one)
            return bits / 8 + SCALE_BYTES_PER_GROUP / self.group_size
        if rows is None or not rows > 0:
            raise ConfigError("pricing a g=channel codec needs the rows per channel (micro-batch x seq-len)")
        padded = max(8, math.ceil(rows / 8) * 8)  # each channel's rows are padded to a multiple of 8
        return (padded * bits / 8 + SCALE_BYTES_PER_GROUP) / rows


def parse_codec_spec(text: str | CodecSpec) -> CodecSpec:
    return text if isinstance(text, CodecSpec) else CodecSpec.parse(text)


def _check_bits(name: str, bits: int | None, *, allow_raw: bool) -> None:
    if bits is None and allow_raw:
        return
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"codec option {name}={bits!r} must be 2..8" + (" or raw" if allow_raw else ""))
