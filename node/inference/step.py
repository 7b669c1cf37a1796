"""One step of a served chain on this node's stage: the hot path of inference.

Protocol (the servicer, node/inference/servicer.py, authorizes the caller and picks the next
hop first; this runs what it accepted):

- Parse: the entries (bounded, validated) and, after the first stage, the packed hidden states
  (codec ``none``: raw bytes, ``int8``: chunks with a checksum; size, dtype and finite checked
  either way; swarm/transport/inference.py). The previous stage's sessions
  named in ``close_session_ids`` are freed first.
- Compute the stage's layers for every entry (swarm/inference/stage_runtime.py). The last stage
  samples one token per entry and answers; any other stage packs its output (only the rows
  the next stage needs: routing.replayed_here) and sends the step on with ``forward``, then
  adds its compute time and commitments to the reply coming back.
- Commitments (spot checks, swarm/inference/verify.py): for the entries the coordinator named,
  sketches of the last position's input and output; for ``commit_points``, sketches of the named
  rows (node/inference/commitments.py). The coordinator asks for them on every step while a check
  can run, so a stage cannot tell which steps are checked.
- ``SWARM_FAULT`` (tests, benchmarks): ``wrong-tokens`` perturbs outputs, ``slowdown`` stretches
  the step; ``SWARM_STEP_TRACE`` stamps each phase (swarm/steptrace.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from swarm.errors import InvalidRequestError, PeerError, SwarmError
from swarm.faults import FaultConfig, FaultInjector
from swarm.inference.commit_sig import MAX_NONCE_BYTES, keep_later, mac_stage, sign_stage
from swarm.inference.stage_runtime import StageRuntime
from swarm.inference.verify import sketch_rows_done, sketch_rows_start
from swarm.proto.v1 import inference_pb2 as pb
from swarm.steptrace import StepTrace
from swarm.transport.inference import entries_from_pb, hidden_fields, hidden_from_request

from node.inference.commitments import commit_points, point_commitments
from node.inference.routing import replayed_here

_TRACE = StepTrace("node")  # SWARM_STEP_TRACE=DIR: per-step timestamps (swarm/steptrace.py)


class StepRunner:
    """Runs the steps this node's stages receive; counts steps and tokens for its metrics."""

    def __init__(self, *, node_id: str, traffic=None, faults: FaultConfig,
                 sign: Callable[[bytes], bytes] | None = None) -> None:
        """``traffic``: node.traffic.Traffic or None (peer bytes); ``faults``: SWARM_FAULT;
        ``sign``: this node's identity signature (its commitments, swarm/inference/commit_sig.py;
        None: unsigned, tests without a coordinator)."""
        self.node_id = node_id
        self._sign = sign
        self._tamper = faults.tamper_relayed  # SWARM_FAULT tamper-relayed (tests): alter later stages' commitments
        self.traffic = traffic
        self._faults = FaultInjector(faults) if faults.wrong_tokens > 0 else None
        self._slowdown = faults.slowdown  # an emulated slower device
        self.steps = 0
        self.tokens = 0

    def step(self, a: pb.ServeStageAssignment, rt: StageRuntime, request: pb.ServeStepRequest,
             forward: Callable[[pb.ServeStepRequest], pb.ServeStepReply], hop: tuple | None, *,
             commit_key: bytes = b"", raw_ok: bool = False) -> pb.ServeStepReply:
        """Run one step of assignment ``a`` on its runtime ``rt``; unless last, ``forward`` it to
        the next stage (``hop``: (stubs, capability, replica, node id, address), from the
        servicer's ``_next_hop``) and return that stage's reply (its errors raised as SwarmErrors).
        ``commit_key``: the stage's key from the coordinator (its commitments carry a MAC with it;
        b"": an Ed25519 signature instead). ``raw_ok``: the next stage reads raw hidden states
        (else they go as chunks, which every node reads)."""
        marks = {"in": _TRACE.now()} if _TRACE.enabled else None
        if request.stage != a.stage:
            raise InvalidRequestError(
                f"step for stage {request.stage} reached the node holding stage {a.stage} of replica {a.replica}"
            )
        if len(request.step_nonce) > MAX_NONCE_BYTES:
            raise InvalidRequestError(f"step_nonce of {len(request.step_nonce)} bytes; at most {MAX_NONCE_BYTES}")
        if request.close_session_ids:
            rt.close(list(request.close_session_ids)[:4096])
        entries = entries_from_pb(request.entries, need_tokens=a.stage == 0,
                                  need_sampling=a.stage == a.num_stages - 1)  # only the last stage samples
        hidden = None
        if a.stage > 0:  # the request came from the previous stage's node: peer traffic
            if self.traffic is not None:
                self.traffic.add_received(request.ByteSize())
            hidden = hidden_from_request(
                request,
                num_tokens=sum(e.num_tokens for e in entries),
                hidden_size=rt.stage.config.hidden_size,
                boundary=a.stage - 1,
                replica=a.replica,
            )
        # entries sampled for a spot check: (entry index, last row of the entry in the packed hidden)
        committed, ends, off = set(request.commit_session_ids[:len(entries)]), [], 0
        for i, e in enumerate(entries):
            off += e.num_tokens
            if e.session_id in committed:
                ends.append((i, off - 1))
        points = commit_points(request.commit_points, entries)  # {entry index: row offsets}
        t0 = time.perf_counter()
        if marks is not None:
            marks["parsed"] = t0
        if a.stage == a.num_stages - 1:
            logits, kept = rt.run_keeping(entries, hidden, points)  # (num_entries, V), {i: (k, V)}
            logits = self._altered(logits)
            kept = {i: self._altered(x) for i, x in kept.items()}
            self._mark(marks, "computed", logits)
            tokens = rt.sample(entries, logits)
            compute = self._slowed(time.perf_counter() - t0)
            self.steps += 1
            self.tokens += len(tokens)
            reply = pb.ServeStepReply(token_ids=tokens, compute_s=compute, stage_compute_s=[compute],
                                      commitments=self._commitments(a, entries, ends, hidden, logits, last=True))
            reply.commitments.extend(point_commitments(a.stage, entries, points, hidden, kept, last=True,
                                                       sample=rt.sample))
            self._signed(reply, a, request.step_nonce, commit_key, last=True)
            if a.stage > 0 and self.traffic is not None:
                self.traffic.add_sent(reply.ByteSize())
            self._trace(marks, "out", entries, a)
            return reply
        out = self._altered(rt.run(entries, hidden))  # (sum num_tokens, H)
        self._mark(marks, "computed", out)
        compute = self._slowed(time.perf_counter() - t0)
        assert hop is not None
        # launched before the output goes to the host, read after the reply: off the critical path
        pending = self._commitments_start(entries, ends, hidden, out, last=False)
        fwd_entries, fwd_out = replayed_here(request.entries, out, a.stage)
        nxt = pb.ServeStepRequest(
            model_name=a.model_name,
            replica=hop[2],
            stage=a.stage + 1,
            entries=fwd_entries,  # as received (validated above): a copy in C, no rebuilding
            **hidden_fields(
                fwd_out, codec=a.hidden_codec or "none", raw=raw_ok, label=f"{a.model_name}/{a.replica}",
                boundary=a.stage, replica=hop[2], sender_id=self.node_id,  # the receiving stage's replica
            ),
            close_session_ids=request.close_session_ids,
            commit_session_ids=request.commit_session_ids,
            commit_points=request.commit_points,
            route=request.route,
            step_nonce=request.step_nonce,
        )
        if self.traffic is not None:
            self.traffic.add_sent(nxt.ByteSize())
        self._mark(marks, "packed")
        try:
            reply = forward(nxt)
        except SwarmError as err:
            if isinstance(err, PeerError) or err.retryable:
                raise PeerError(f"next stage {a.stage + 1} ({hop[3][:12]} at {hop[4]}) failed: {err}") from err
            raise
        self._mark(marks, "back")
        self.steps += 1
        if self.traffic is not None:
            self.traffic.add_received(reply.ByteSize())  # as the next stage sent it
        reply.compute_s += compute
        reply.stage_compute_s.append(compute)
        if self._tamper:
            self._tamper_later(reply, a.stage)
        if request.step_nonce:
            keep_later(reply, a.stage)  # a later stage cannot speak for this one or an earlier one
        reply.commitments.extend(self._commitments_done(a, entries, ends, pending))
        reply.commitments.extend(point_commitments(a.stage, entries, points, hidden, out, last=False))
        self._signed(reply, a, request.step_nonce, commit_key, last=False)
        if self.traffic is not None and a.stage > 0:
            self.traffic.add_sent(reply.ByteSize())
        self._trace(marks, "out", entries, a)
        return reply

    def _signed(self, reply: pb.ServeStepReply, a: pb.ServeStageAssignment, nonce: bytes, key: bytes, *,
                last: bool) -> None:
        """Authenticate this stage's commitments in ``reply`` for the step of ``nonce`` (when it asked
        some): a MAC with its commit ``key``, else its identity's signature."""
        if not nonce:
            return
        if key:
            mac_stage(reply, model=a.model_name, stage=a.stage, nonce=nonce, last=last, key=key)
        elif self._sign is not None:
            sign_stage(reply, model=a.model_name, stage=a.stage, nonce=nonce, last=last, sign=self._sign)

    @staticmethod
    def _tamper_later(reply: pb.ServeStepReply, stage: int) -> None:
        """SWARM_FAULT tamper-relayed (tests only): as a relaying stage bent on framing the next one,
        turn every later stage's output commitment around."""
        for c in reply.commitments:
            if c.stage > stage and len(c.output):
                c.output[:] = [-v for v in c.output]

    @staticmethod
    def _mark(marks: dict | None, name: str, synced: torch.Tensor | None = None) -> None:
        """SWARM_STEP_TRACE only: a timestamp (after the device finished ``synced``'s work)."""
        if marks is not None:
            if synced is not None and synced.is_cuda:
                torch.cuda.synchronize(synced.device)
            marks[name] = _TRACE.now()

    @staticmethod
    def _trace(marks: dict | None, last: str, entries, a) -> None:
        if marks is not None and entries:
            marks[last] = _TRACE.now()
            _TRACE.write((entries[0].session_id, entries[0].start_position), a.stage, marks,
                         model=a.model_name, entries=len(entries))

    def _altered(self, out: torch.Tensor) -> torch.Tensor:
        """SWARM_FAULT wrong-tokens (tests only): this step's output perturbed, with its probability."""
        return out if self._faults is None else self._faults.corrupt_hidden(out)

    def _slowed(self, compute_s: float) -> float:
        """SWARM_FAULT slowdown=F (tests, benchmarks): the step takes F times its compute time."""
        if self._slowdown > 1.0:
            time.sleep((self._slowdown - 1.0) * compute_s)
            return compute_s * self._slowdown
        return compute_s

    @classmethod
    def _commitments(cls, a: pb.ServeStageAssignment, entries, ends: list[tuple[int, int]],
                     hidden: torch.Tensor | None, out: torch.Tensor, *, last: bool) -> list[pb.ServeCommitment]:
        """This stage's commitments (swarm/inference/verify.py) for the sampled entries: sketches of
        the last position of its input and of its output (logits rows on the last stage)."""
        return cls._commitments_done(a, entries, ends, cls._commitments_start(entries, ends, hidden, out, last=last))

    @staticmethod
    def _commitments_start(entries, ends: list[tuple[int, int]], hidden: torch.Tensor | None, out: torch.Tensor,
                           *, last: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The commitments' sketches, computed on the device and not waited for (None: no entry sampled)."""
        if not ends:
            return None
        rows, idx = [row for _, row in ends], [i for i, _ in ends]
        # every row committed (decode steps of sessions that all commit): no gather needed;
        # rows and idx are increasing and distinct, so as many as the tensor has are all of them
        pick = lambda t, sel: t if len(sel) == t.shape[0] else t[sel]  # noqa: E731
        outs = sketch_rows_start(pick(out, idx if last else rows))
        ins = sketch_rows_start(pick(hidden, rows)) if hidden is not None else None
        return outs, ins

    @staticmethod
    def _commitments_done(a: pb.ServeStageAssignment, entries, ends: list[tuple[int, int]],
                          pending: tuple[torch.Tensor, torch.Tensor | None] | None) -> list[pb.ServeCommitment]:
        if pending is None:
            return []
        outs = sketch_rows_done(pending[0])
        ins = sketch_rows_done(pending[1]) if pending[1] is not None else [()] * len(ends)
        return [pb.ServeCommitment(stage=a.stage, session_id=entries[i].session_id, input=inp, output=o)
                for (i, _), inp, o in zip(ends, ins, outs)]
