"""Spot checks of inference steps: commitments and the decision (docs/security.md, "Verification").

Protocol (the coordinator's side is coordinator/inference/checks.py):

- For a sampled entry of a step (a session's step, chosen with probability ``--verify-prob``)
  the coordinator asks the chain to commit (``commit_session_ids``): every stage returns
  :func:`sketch` of the last position of the hidden state it received (``input``, a witness of
  the previous stage's output) and of what it output (hidden state sent on; logits on the last
  stage). A sketch is ``SKETCH_DIM`` float32 values, 256 bytes per stage and entry for both.
- The same context (prompt + tokens so far) is replayed as a temporary session on another ready
  chain of the model, with the same request; :func:`agree` compares the two chains at every layer
  boundary both have and their tokens. The token of a checked step reaches the client only
  after the check passed.
- Without another chain to replay it, the context is recomputed by the coordinator (the referee,
  within a budget: swarm/inference/referee.py) and :func:`resolve_by_reference` judges the serving
  chain against it alone.
- When they disagree, the second opinion is the coordinator's recomputation from the checkpoint
  it holds (:class:`Reference`); :func:`judge` weighs each chain against it, stage by stage, and
  :func:`resolve` says what to do: release the token or not, whom to quarantine, which chains
  to retire (their sessions are replayed elsewhere).

Pure apart from :func:`sketch` (torch); everything the decision needs is in frozen dataclasses.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

SKETCH_DIM = 32  # the relative distance estimate spreads by about sqrt(2 / 32) = 25%
# Relative L2 distance an honest recomputation may show: the training spot checks' output
# tolerance (node/training/spotcheck.py, TOLERANCE["output"], chosen from measured honest
# differences: CPU fp32 < 1e-5; a tensor perturbed by noise of its own scale, as SWARM_FAULT
# does, shows ~1-1.4). Serving in bf16 / through the int8 hidden codec adds ~1e-2 (one rounding
# per layer, and 8-bit rounding of the hop), still a tenth of it; the sketch's 25% spread does
# not bring either side near it.
TOLERANCE = 0.1
# A token that differs from the recomputation's is wrong only when its recomputed logit is more
# than this many logit RMS below the chosen token's: an honest relative error up to TOLERANCE
# moves a logit by about TOLERANCE x RMS, so near-ties may flip honestly.
TOKEN_SLACK_RMS = 2 * TOLERANCE

_SKETCH_SEED = 0x70C10C
_maps: dict[tuple[int, torch.device], torch.Tensor] = {}
_maps_lock = threading.Lock()


def _projection(dim: int, device: torch.device) -> torch.Tensor:
    key = (dim, device)
    p = _maps.get(key)  # made once per (dim, device); every step of every stage looks it up
    if p is not None:
        return p
    with _maps_lock:
        p = _maps.get(key)
        if p is None:
            g = torch.Generator().manual_seed(_SKETCH_SEED + dim)
            p = (torch.randn(dim, SKETCH_DIM, generator=g) / math.sqrt(SKETCH_DIM)).to(device)
            _maps[key] = p
        return p


def sketch(x: torch.Tensor) -> tuple[float, ...]:
    """A Gaussian projection of the vector ``x`` (D,) to SKETCH_DIM values: the same on every
    node for the same D (fixed seed); distances between sketches estimate distances between
    vectors (Johnson-Lindenstrauss)."""
    x = x.detach().reshape(-1).float()
    return tuple(float(v) for v in (x @ _projection(x.numel(), x.device)).cpu())


def sketch_rows(x: torch.Tensor) -> list[tuple[float, ...]]:
    """:func:`sketch` of every row of ``x`` (n, D), in one product and one copy to the host."""
    return sketch_rows_done(sketch_rows_start(x))


def sketch_rows_start(x: torch.Tensor) -> torch.Tensor:
    """The sketches of ``x``'s rows (n, SKETCH_DIM) on ``x``'s device, not waited for: launched
    before a stage's output is copied to the host, they are done by the time it is sent."""
    x = x.detach().float()
    return x @ _projection(x.shape[1], x.device)


def sketch_rows_done(sketches: torch.Tensor) -> list[tuple[float, ...]]:
    """The rows of :func:`sketch_rows_start`'s result, on the host."""
    if sketches.shape[0] == 0:
        return []
    return [tuple(row) for row in sketches.cpu().tolist()]


def distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Relative L2 distance ||a - b|| / ||b|| of two sketches; inf when either is missing or not
    finite (a stage that does not commit cannot pass)."""
    if len(a) != SKETCH_DIM or len(b) != SKETCH_DIM or not all(map(math.isfinite, a + b)):
        return math.inf
    num = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))
    den = math.sqrt(sum(y * y for y in b))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def allowed_tokens(logits: torch.Tensor, params) -> frozenset[int]:
    """Tokens an honest chain may return for these recomputed ``logits`` (V,) and sampling
    ``params`` (swarm.inference.params.SamplingParams): greedy, those within TOKEN_SLACK_RMS
    logit RMS of the top one; sampled, any token the filters keep (a draw cannot be judged)."""
    x = logits.detach().float().reshape(-1)
    if params.greedy:
        rms = float(x.pow(2).mean().sqrt())
        keep = x >= x.max() - TOKEN_SLACK_RMS * rms
    else:
        from swarm.inference.sampling import filtered_logits

        keep = torch.isfinite(filtered_logits(x, params))
    return frozenset(int(i) for i in torch.nonzero(keep).reshape(-1).tolist())


@dataclass(frozen=True, slots=True, kw_only=True)
class StageCommit:
    """What one stage of a chain committed to for a checked entry."""

    node_id: str
    first_layer: int
    last_layer_excl: int
    input: tuple[float, ...] = ()  # () on the first stage, or when the stage sent none
    output: tuple[float, ...] = ()
    # signed by its node for this step (swarm/inference/commit_sig.py); False: the stages relaying
    # the reply may have altered them (or it sent none), so nobody is judged on them
    authentic: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class PushedKV:
    """An accepted KV hand-off of one stage of a decode chain (swarm/inference/kv_receipt.py): who
    pushed to whom, how many positions, and the digest (the sketch's seed) and sketch both ends
    agreed on."""

    stage: int
    prefill_node: str
    decode_node: str
    positions: int
    digest: bytes
    sketch: tuple[float, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainResult:
    """One chain's answer for a checked entry: its stages' commitments (in order) and its token."""

    replica: int
    stages: tuple[StageCommit, ...]
    token: int
    # every earlier step of the session on this chain was checked and passed (or there was none):
    # the stages' caches hold only verified inputs. Otherwise a stage after the first may be wrong
    # because of an input it received at an unchecked step, and it is not blamed.
    fresh: bool = True
    # the chain's caches of the session began with KV pushed by another chain's stages (disaggregated
    # serving): a stage's wrong output from a right input may be the pusher's, so nobody is blamed for it
    cache_pushed: bool = False
    # the accepted hand-offs of those pushed caches, one per stage (empty when they carried no
    # commitment): with the referee's recomputation of the KV they say who is to blame
    pushed_kv: tuple[PushedKV, ...] = ()

    def pushed(self, stage: int) -> PushedKV | None:
        return next((p for p in self.pushed_kv if p.stage == stage), None)

    def outputs(self) -> dict[int, tuple[float, ...]]:
        """Output sketch per layer boundary (the layer index the stage ends at)."""
        return {s.last_layer_excl: s.output for s in self.stages}


@dataclass(frozen=True, slots=True, kw_only=True)
class Reference:
    """The coordinator's recomputation: output sketches per layer boundary (the last boundary,
    the number of layers, holds the logits) and the tokens an honest chain may return."""

    outputs: dict[int, tuple[float, ...]]
    tokens: frozenset[int]
    # stage index -> sketch of the KV that stage's pushed positions should hold, with the seed of
    # the serving chain's record (:class:`PushedKV`); only for chains whose caches were pushed
    kv: dict[int, tuple[float, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Judgement:
    ok: bool
    guilty: str | None = None  # node id whose own commitment is wrong
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What to do after a check. ``release``: give the serving chain's token to the client;
    ``quarantine``: (node id, reason); ``retire``: replica indexes to fail over."""

    release: bool
    quarantine: tuple[tuple[str, str], ...] = ()
    retire: tuple[int, ...] = ()
    reason: str = ""
    disputed: bool = False  # the chains disagreed (a second opinion was needed)


def consistent(chain: ChainResult) -> bool:
    """Whether every stage received (within TOLERANCE) what the stage before it committed to sending."""
    return all(distance(st.input, prev.output) <= TOLERANCE for prev, st in zip(chain.stages, chain.stages[1:]))


def agree(serving: ChainResult, checker: ChainResult) -> bool:
    """Whether two consistent chains gave the same token and outputs within TOLERANCE at every
    layer boundary both have (their layer splits may differ)."""
    if serving.token != checker.token or not consistent(serving) or not consistent(checker):
        return False
    if not all(st.authentic for st in serving.stages + checker.stages):
        return False
    a, b = serving.outputs(), checker.outputs()
    shared = set(a) & set(b)
    return bool(shared) and all(distance(a[k], b[k]) <= TOLERANCE for k in shared)


def judge(chain: ChainResult, ref: Reference) -> Judgement:
    """Weigh one chain against the recomputation, stage by stage. The first stage whose own
    output commitment is beyond TOLERANCE is guilty. A stage whose *input* differs while the
    previous stage's output commitment matched means one of the two lies about the hop: nobody
    can be blamed (ok False, guilty None). A wrong token with right logits blames the last stage.
    A chain with a stage whose commitments are not ``authentic`` (unsigned for the step: altered by
    a relaying stage, or never sent) is wrong and nobody is blamed.
    A stage after the first of a chain that is not ``fresh`` is not blamed for its output (ok
    False, guilty None). A stage of a chain whose caches were pushed (``cache_pushed``) is weighed
    by its hand-off's commitment (``pushed_kv``) against the recomputed KV (``ref.kv``): a wrong
    pushed cache blames its pusher, a right one leaves the stage's output its own; without both,
    it is not blamed."""
    forged = next((k for k, st in enumerate(chain.stages) if not st.authentic), None)
    if forged is not None:
        st = chain.stages[forged]
        return Judgement(ok=False, reason=(
            f"replica {chain.replica}: stage {forged}'s commitments are not signed by its node {st.node_id[:12]} for "
            "this step: a stage relaying the reply altered them, or it sent none; nobody can be blamed"))
    prev: StageCommit | None = None
    for k, st in enumerate(chain.stages):
        if prev is not None:
            want = ref.outputs.get(prev.last_layer_excl, ())
            d = distance(st.input, want)
            if d > TOLERANCE:
                return Judgement(ok=False, reason=(
                    f"replica {chain.replica}: stage {k} received a hidden state {d:.3g} (relative L2) away from "
                    f"what stage {k - 1} committed to sending; one of nodes {prev.node_id[:12]}, {st.node_id[:12]} lies"))
        d = distance(st.output, ref.outputs.get(st.last_layer_excl, ()))
        pushed, want_kv = chain.pushed(k), ref.kv.get(k)
        if d > TOLERANCE and chain.cache_pushed and pushed is not None and want_kv is not None:
            kd = distance(pushed.sketch, want_kv)
            if kd > TOLERANCE:  # the cache it was given was wrong, and its pusher committed to it
                return Judgement(ok=False, guilty=pushed.prefill_node, reason=(
                    f"inference spot check: node {pushed.prefill_node[:12]} pushed stage {k}'s KV cache of "
                    f"{pushed.positions} positions {kd:.3g} relative L2 away from the recomputation (tolerance "
                    f"{TOLERANCE:g}), as both ends of the hand-off committed"))
        if d > TOLERANCE and k > 0 and not chain.fresh:
            return Judgement(ok=False, reason=(
                f"replica {chain.replica}: stage {k} output {d:.3g} (relative L2) away from the recomputation, from "
                "a right input, but its cache holds inputs of unchecked steps: not blamed"))
        if d > TOLERANCE and chain.cache_pushed and (pushed is None or want_kv is None):
            return Judgement(ok=False, reason=(
                f"replica {chain.replica}: stage {k} output {d:.3g} (relative L2) away from the recomputation, from "
                "a right input, but its cache began with KV a prefill node pushed and no commitment of it can be "
                "weighed: not blamed"))
        # a pushed cache shown right leaves the stage's output its own
        if d > TOLERANCE:
            return Judgement(ok=False, guilty=st.node_id, reason=(
                f"inference spot check: stage {k} (layers {st.first_layer}-{st.last_layer_excl}) of replica "
                f"{chain.replica} output {d:.3g} relative L2 away from the recomputation (tolerance {TOLERANCE:g})"))
        prev = st
    if chain.token not in ref.tokens:
        last = chain.stages[-1]
        return Judgement(ok=False, guilty=last.node_id, reason=(
            f"inference spot check: last stage of replica {chain.replica} returned token {chain.token}, "
            f"which the recomputation rules out ({sorted(ref.tokens)[:4]} allowed)"))
    return Judgement(ok=True)


def resolve(serving: ChainResult, checker: ChainResult | None, ref: Reference | None) -> Outcome:
    """The decision after a check. ``checker`` None: no other chain could replay it (void:
    released unchecked). ``ref`` None while the chains agree (no second opinion needed); when
    they disagree and no recomputation was possible, the serving chain is retired (its token
    withheld, the session replayed elsewhere) and nobody is quarantined."""
    if checker is None:
        return Outcome(release=True, reason="no other chain to check against")
    if agree(serving, checker):
        return Outcome(release=True)
    if ref is None:
        return Outcome(release=False, retire=(serving.replica,), disputed=True,
                       reason="chains disagree and no recomputation was possible")
    quarantine, retire, reasons = [], [], []
    release = True
    for chain in (serving, checker):
        j = judge(chain, ref)
        if j.ok:
            continue
        retire.append(chain.replica)
        reasons.append(j.reason)
        if j.guilty is not None:
            quarantine.append((j.guilty, j.reason))
        if chain is serving:
            release = False
    return Outcome(release=release, quarantine=tuple(quarantine), retire=tuple(retire), disputed=True,
                   reason="; ".join(reasons) or "chains disagreed; the recomputation agrees with both")


def resolve_by_reference(serving: ChainResult, ref: Reference) -> Outcome:
    """The decision after a check whose replay ran on the coordinator's recomputation (no other
    chain could replay it: checks.py, "referee"): ``serving`` is judged against ``ref`` directly,
    as :func:`resolve` judges a disputed chain. Judged wrong, its token is withheld and the chain
    retired; the stage whose own commitment is wrong, if one is, is quarantined."""
    j = judge(serving, ref)
    if j.ok:
        return Outcome(release=True)
    return Outcome(release=False, retire=(serving.replica,), disputed=True, reason=j.reason,
                   quarantine=((j.guilty, j.reason),) if j.guilty is not None else ())
