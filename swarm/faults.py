"""Faults a node can be told to inject, FOR TESTING the swarm's verification (docs/security.md).

``SWARM_FAULT`` (read by ``swarm-node join`` at start, parsed here once into a
:class:`FaultConfig`) is a comma-separated list of:

- ``corrupt-activations=P``: perturb a fraction P of the tensors this node sends (activations
  forward, gradients backward) with noise of the tensor's own scale (so they look plausible);
- ``wrong-tokens=P``: inference: alter the hidden state of a fraction P of the steps it serves;
- ``corrupt-kv=P``: disaggregated serving: perturb a fraction P of the KV caches this node
  pushes to decode nodes (committing to what it sent, as a liar that cannot forge the decode
  node's receipt must: swarm/inference/kv_receipt.py);
- ``tamper-relayed=1``: inference: alter the later stages' commitments in every step reply it
  relays back (a relaying stage framing the next; swarm/inference/commit_sig.py stops it);
- ``claim-tflops=X``: report X TFLOPS instead of the measured figure;
- ``claim-mem-bandwidth=X``: report X bytes/s of memory bandwidth instead of the measured figure;
- ``claim-device=NAME``: report device name NAME (nodes of one machine then look like different
  hardware to placement, which pools the figures of one device model: disaggregation.pool_alike);
- ``misreport-weights=1``: training: report a parameter sketch 5% off its weights' every step
  (a node that voids the spot checks of it; coordinator/jobs/spotchecks.py watches for it);
- ``false-checks=P``: training: report a fraction P of the spot checks this node runs of another
  node as confirmed mismatches (a checker framing the node it checks; the coordinator's judge
  needs a second checker before it quarantines anyone: coordinator/jobs/spotchecks.py);
- ``false-witness=P``: training: perturb a fraction P of the witness copies this node sends a
  checker of its neighbour (a witness framing the node it witnesses), and commit to the false
  copy as what it sent or received, as a witness covering its lie would (the coordinator weighs
  copies against the checked node's own commitments: coordinator/jobs/binding.py);
- ``stall-after-steps=N``: stop training after N steps of a job, but keep heartbeating;
- ``slowdown=F``: every inference step this node serves, and every training forward and
  backward it computes, takes F times its compute time (an emulated slower device, for
  bench/serving.py on a machine too small to slow a node by its thread count, and for the
  neighbour-seen speed estimate of coordinator/jobs/speed.py).

An honest node has ``FaultConfig()`` (no faults). Randomness comes from ``seed``.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from swarm.errors import ConfigError

if TYPE_CHECKING:
    import torch

FAULT_ENV = "SWARM_FAULT"
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultConfig:
    corrupt_activations: float = 0.0
    wrong_tokens: float = 0.0
    corrupt_kv: float = 0.0
    false_checks: float = 0.0
    false_witness: float = 0.0
    tamper_relayed: bool = False
    misreport_weights: bool = False
    claim_tflops: float | None = None
    claim_mem_bandwidth: float | None = None
    claim_device: str | None = None
    stall_after_steps: int | None = None
    slowdown: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("corrupt_activations", "wrong_tokens", "corrupt_kv", "false_checks", "false_witness"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ConfigError(f"{FAULT_ENV}: {name.replace('_', '-')} must be a fraction in 0..1, got {v}")
        if self.claim_tflops is not None and not (math.isfinite(self.claim_tflops) and 0 <= self.claim_tflops <= 1e5):
            raise ConfigError(f"{FAULT_ENV}: claim-tflops must be in 0..1e5, got {self.claim_tflops}")
        if self.claim_mem_bandwidth is not None and not (math.isfinite(self.claim_mem_bandwidth)
                                                         and 1e8 <= self.claim_mem_bandwidth <= 5e13):
            raise ConfigError(f"{FAULT_ENV}: claim-mem-bandwidth must be in 1e8..5e13 bytes/s, got {self.claim_mem_bandwidth}")
        if self.claim_device is not None and not 0 < len(self.claim_device) <= 200:
            raise ConfigError(f"{FAULT_ENV}: claim-device must be 1..200 characters")
        if not (math.isfinite(self.slowdown) and 1.0 <= self.slowdown <= 100.0):
            raise ConfigError(f"{FAULT_ENV}: slowdown must be a factor in 1..100, got {self.slowdown}")
        if self.stall_after_steps is not None and self.stall_after_steps < 0:
            raise ConfigError(f"{FAULT_ENV}: stall-after-steps must be >= 0, got {self.stall_after_steps}")

    @property
    def any(self) -> bool:
        return (self.corrupt_activations > 0 or self.wrong_tokens > 0 or self.corrupt_kv > 0 or self.false_checks > 0
                or self.false_witness > 0 or self.tamper_relayed
                or self.misreport_weights
                or self.claim_tflops is not None
                or self.claim_mem_bandwidth is not None or self.claim_device is not None
                or self.stall_after_steps is not None or self.slowdown > 1.0)

    @classmethod
    def parse(cls, text: str | None, *, seed: int = 0) -> FaultConfig:
        """``"corrupt-activations=0.2,stall-after-steps=5"`` -> FaultConfig. Raises ConfigError."""
        values: dict[str, object] = {}
        for item in (text or "").split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep:
                raise ConfigError(f"{FAULT_ENV}: {item!r} must be NAME=VALUE")
            try:
                if key in ("corrupt-activations", "wrong-tokens", "corrupt-kv", "false-checks", "false-witness",
                           "claim-tflops",
                           "claim-mem-bandwidth", "slowdown"):
                    values[key.replace("-", "_")] = float(raw)
                elif key in ("tamper-relayed", "misreport-weights"):
                    values[key.replace("-", "_")] = raw.strip() not in ("0", "false", "")
                elif key == "claim-device":
                    values["claim_device"] = raw.strip()
                elif key == "stall-after-steps":
                    values["stall_after_steps"] = int(raw)
                else:
                    raise ConfigError(f"{FAULT_ENV}: unknown fault {key!r}; known: corrupt-activations, "
                                      "wrong-tokens, corrupt-kv, false-checks, false-witness, tamper-relayed, misreport-weights, claim-tflops, "
                                      "claim-mem-bandwidth, claim-device, "
                                      "stall-after-steps, slowdown")
            except ValueError as exc:
                raise ConfigError(f"{FAULT_ENV}: {key} has a bad value {raw!r}") from exc
        return cls(seed=seed, **values)  # type: ignore[arg-type]


class FaultInjector:
    """Carries out a :class:`FaultConfig` (thread-safe enough: one RNG per injector)."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        import torch

        self._rng = random.Random(config.seed)
        self._gen = torch.Generator().manual_seed(config.seed)
        self.num_corrupted = 0

    def _hit(self, p: float) -> bool:
        return p > 0 and self._rng.random() < p

    def perturb(self, t: torch.Tensor, p: float) -> torch.Tensor:
        """With probability ``p``, ``t`` plus Gaussian noise of ``t``'s own standard deviation."""
        if not self._hit(p):
            return t
        import torch

        self.num_corrupted += 1
        log.info("SWARM_FAULT: corrupting a tensor (%d so far)", self.num_corrupted)
        scale = float(t.detach().float().std()) or 1.0
        noise = torch.randn(t.shape, generator=self._gen, dtype=torch.float32).to(t.device, t.dtype)
        return t + scale * noise

    def corrupt_sent(self, t: torch.Tensor) -> torch.Tensor:
        return self.perturb(t, self.config.corrupt_activations)

    def corrupt_hidden(self, t: torch.Tensor) -> torch.Tensor:
        return self.perturb(t, self.config.wrong_tokens)

    def lies_in_check(self) -> bool:
        """``false-checks=P``: whether to report this spot check as a confirmed mismatch."""
        return self._hit(self.config.false_checks)

    def lies_as_witness(self) -> bool:
        """``false-witness=P``: whether to send this witness copy falsified (:meth:`false_copy`)."""
        return self._hit(self.config.false_witness)

    def false_copy(self, t: torch.Tensor) -> torch.Tensor:
        """A witness copy of ``t`` made to look wrong: ``t`` plus noise of its own scale."""
        return self.perturb(t, 1.0)

    def slow_down(self, compute_s: float) -> None:
        """``slowdown=F``: sleep (F - 1) x ``compute_s`` (the work just done took F times as long)."""
        if self.config.slowdown > 1.0 and compute_s > 0:
            import time

            time.sleep((self.config.slowdown - 1.0) * compute_s)

    def reported_sketch(self, sketch: tuple[float, ...]) -> tuple[float, ...]:
        """The parameter sketch to report: ``sketch``, or 5% off it under ``misreport-weights``."""
        if not self.config.misreport_weights or not sketch:
            return sketch
        return tuple(x * 1.05 for x in sketch)

    def stalls_at(self, steps_done: int) -> bool:
        n = self.config.stall_after_steps
        return n is not None and steps_done >= n


NO_FAULTS = FaultConfig()
