"""A re-planned worker's stage state (weights + AdamW state) at a fence's switch step, copied
peer to peer from a live replica instead of the coordinator.

At a fence (coordinator/jobs/churn.py) every live worker saves its stage's state at the switch
step ``S`` on its disk (node/training/checkpoints.py: ``weights.safetensors``,
``optimizer.safetensors``) and uploads a copy to the coordinator. The coordinator re-plans from
``S`` and names, in each new worker's assignment, a *state source*
(:class:`~node.training.assignment.StateSource`): the node of the live worker whose copy it
resumes the stage from, with the SHA-256 of that copy's two files.

Protocol (``PipelinePeer.FetchStageState``, training.proto), for a worker of the new attempt:

1. its own node is the source and its files at ``S`` have the recorded hashes: it loads them
   from disk (``local``, nothing copied);
2. else it asks the source node (``peer``): the source's :class:`StateServer` answers only a
   caller whose certificate names a node the coordinator assigned to that job, attempt and
   stage (this node's own assignment lists them), and only when it is that stage's named source;
   it streams the two files with :mod:`swarm.transport.transfer` (header with size and SHA-256,
   then chunks). The fetcher refuses a header whose hash is not the coordinator's *before*
   reading its bytes, and the transfer module refuses bytes that do not match their header: a
   lying peer cannot hand over other state. A source that has not switched to the attempt yet
   answers UNAVAILABLE, retried for up to ``timeout_s``;
3. any refusal or failure: the coordinator's copy (``coordinator``, FetchStageWeights), with a
   warning naming why. The worker reports where its state came from in its ``ready`` report;
   the coordinator puts it in the ``replica_added`` event.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from swarm.errors import (InvalidRequestError, NotFoundError, PermissionDeniedError, SwarmError,
                          UnavailableError)
from swarm.proto.v1 import training_pb2 as pb
from swarm.proto.v1 import training_pb2_grpc as pb_grpc
from swarm.transport import transfer, transfer_pb
from swarm.transport.channels import data_channel
from swarm.transport.errors import translate_rpc_errors

from node.training.assignment import Assignment, Peer

log = logging.getLogger(__name__)

WEIGHTS, OPTIMIZER = "weights.safetensors", "optimizer.safetensors"
STATE_FILES = (WEIGHTS, OPTIMIZER)
RETRY_S = 0.2  # between asks to a source that has not switched to the attempt yet
MAX_STATE_BYTES = 64 << 30  # per file and in total: a stage's weights + moments, far above any we train


@dataclass(frozen=True, slots=True, kw_only=True)
class StageState:
    """A stage's state at the resume step. ``optimizer`` None: none to resume (AdamW restarts)."""

    weights: bytes  # safetensors blob, HF names
    optimizer: bytes | None  # safetensors blob, swarm/pipeline/optim_state.py keys
    source: str  # "local" | "peer" | "coordinator"
    num_bytes: int  # copied over the network to get it


# ----------------------------------------------------------------------------- pure decisions
def choose_source(a: Assignment, *, node_id: str, local_hashes: dict[str, str] | None) -> str:
    """"local", "peer" or "coordinator": where this node's worker of ``a`` takes its state from.
    ``local_hashes``: SHA-256 of the files this node holds for the stage at the resume step."""
    src = a.state_source
    if src is None or a.resume_step == 0:
        return "coordinator"
    if local_hashes is not None and local_hashes == src.hashes:
        return "local"  # a survivor holding exactly the state the others copy
    if src.peer.node_id != node_id:
        return "peer"
    return "coordinator"  # we are the source but our files are gone or differ


def check_offered(expected: dict[str, str] | None, header: transfer.FileHeader, *, peer: str) -> None:
    """Refuse (InvalidRequestError) a file a source offers that is not one the coordinator
    recorded, with that SHA-256 (``expected`` None: not one of :data:`STATE_FILES`); called
    before any byte of it is read."""
    if expected is None:
        expected = {n: header.sha256 for n in STATE_FILES}
    want = expected.get(header.name)
    if want is None:
        raise InvalidRequestError(f"node {peer[:12]} offered {header.name[:80]!r}, not one of {sorted(expected)}")
    if header.sha256 != want:
        raise InvalidRequestError(f"node {peer[:12]} offered {header.name} with SHA-256 {header.sha256[:16]}..., "
                                  f"the coordinator recorded {want[:16]}... for that state: refusing its copy")


# ----------------------------------------------------------------------------- local files
def local_state_dir(state_dir: Path, job_id: str, stage: int, step: int) -> Path | None:
    """This node's newest saved state of ``stage`` at ``step`` (under any replica index it had, or
    the copy it keeps of another node's checkpoint: node/training/kept.py)."""
    root = Path(state_dir) / "training" / job_id
    found = [d for pattern in (f"stage-{stage}-r*/step-{step:08d}", f"kept-stage-{stage}/step-{step:08d}")
             for d in root.glob(pattern) if all((d / n).is_file() for n in STATE_FILES)]
    return max(found, key=lambda d: d.stat().st_mtime) if found else None


def file_hashes(directory: Path) -> dict[str, str]:
    return {n: transfer.sha256_file(Path(directory) / n) for n in STATE_FILES}


def _read(directory: Path, *, source: str, num_bytes: int) -> StageState:
    return StageState(weights=(directory / WEIGHTS).read_bytes(), optimizer=(directory / OPTIMIZER).read_bytes(),
                      source=source, num_bytes=num_bytes)


# ----------------------------------------------------------------------------- fetching
def fetch_files(peer: Peer, req: pb.FetchStageStateRequest, *, expected: dict[str, str] | None, security,
                dest: Path, timeout_s: float, what: str) -> int:
    """Copy the state files ``req`` names from ``peer`` (``FetchStageState``) into ``dest``; each file
    offered is checked against ``expected`` (name -> SHA-256; None: any of :data:`STATE_FILES`,
    checked only against its header) before a byte of it is read, and every file against its
    header. Returns the bytes received. A peer answering UNAVAILABLE is asked again every
    :data:`RETRY_S` for up to ``timeout_s``. Raises SwarmError (nothing kept in ``dest``)."""
    limits = transfer.TransferLimits(max_file_bytes=MAX_STATE_BYTES, max_total_bytes=MAX_STATE_BYTES,
                                     max_files=len(STATE_FILES))
    deadline = time.monotonic() + timeout_s
    channel = data_channel(peer.address, security=security, node_id=peer.node_id)
    try:
        stub = pb_grpc.PipelinePeerStub(channel)
        while True:
            receiver = transfer.FileReceiver(dest, limits=limits)
            try:
                with translate_rpc_errors(f"node {peer.node_id[:12]} ({what})"):
                    for item in transfer_pb.from_messages(stub.FetchStageState(req, timeout=timeout_s)):
                        if isinstance(item, transfer.FileHeader):
                            check_offered(expected, item, peer=peer.node_id)
                            receiver.start(item)
                        else:
                            receiver.write(item)
                    names = {str(n) for n in receiver.finish()}
                if names != set(STATE_FILES):
                    raise InvalidRequestError(f"node {peer.node_id[:12]} sent {sorted(names)}, not the stage's "
                                              f"state {sorted(STATE_FILES)}")
                return receiver.total_bytes
            except UnavailableError:  # the source has not switched to this attempt / saved that step yet
                receiver.abort()
                if time.monotonic() + RETRY_S > deadline:
                    raise
                time.sleep(RETRY_S)
            except BaseException:
                receiver.abort()
                shutil.rmtree(dest, ignore_errors=True)
                raise
    finally:
        channel.close()


def fetch_from_peer(a: Assignment, *, security, dest: Path, timeout_s: float) -> int:
    """Copy the stage's state files from ``a.state_source`` into ``dest``, each checked against the
    coordinator's hash; returns the bytes received. Raises SwarmError (nothing kept in ``dest``)."""
    src = a.state_source
    assert src is not None
    req = pb.FetchStageStateRequest(job_id=a.job_id, stage=src.stage, attempt=a.attempt)
    return fetch_files(src.peer, req, expected=src.hashes, security=security, dest=dest, timeout_s=timeout_s,
                       what=f"stage {a.stage}'s state source")


def obtain_stage_state(a: Assignment, *, node_id: str, state_dir: Path, security,
                       from_coordinator: Callable[[], StageState], timeout_s: float) -> StageState:
    """The stage's state at ``a.resume_step``: from disk, a live replica or the coordinator (see
    the module docstring); a failed or refused local/peer copy falls back to the coordinator."""
    if a.state_source is None or a.resume_step == 0:
        return from_coordinator()
    d = local_state_dir(state_dir, a.job_id, a.state_source.stage, a.resume_step)
    choice = choose_source(a, node_id=node_id, local_hashes=file_hashes(d) if d is not None else None)
    if choice == "coordinator" and a.state_source.required:
        raise NotFoundError(f"stage {a.stage}'s state at step {a.resume_step} is lost on the coordinator and this "
                            f"node (its named keeper) no longer holds the recorded copy")
    try:
        if choice == "local":
            log.info("stage state from this node's disk job=%s stage=%d step=%d dir=%s", a.job_id, a.stage,
                     a.resume_step, d)
            return _read(d, source="local", num_bytes=0)
        if choice == "peer":
            tmp = Path(state_dir) / "training" / a.job_id / f"incoming-stage-{a.stage}-a{a.attempt}"
            shutil.rmtree(tmp, ignore_errors=True)
            t0 = time.monotonic()
            n = fetch_from_peer(a, security=security, dest=tmp, timeout_s=timeout_s)
            try:
                state = _read(tmp, source="peer", num_bytes=n)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("stage state copied from a live replica job=%s stage=%d step=%d peer=%s bytes=%d took=%.2fs",
                     a.job_id, a.stage, a.resume_step, a.state_source.peer.node_id[:12], n, time.monotonic() - t0)
            return state
    except (SwarmError, OSError) as exc:
        if a.state_source.required:
            raise UnavailableError(f"stage {a.stage}'s state at step {a.resume_step} exists only on node "
                                   f"{a.state_source.peer.node_id[:12]} (the coordinator's copy is lost) and "
                                   f"could not be copied: {exc}") from exc
        log.warning("stage state of job=%s stage=%d at step %d not taken from %s (%s); using the coordinator's copy",
                    a.job_id, a.stage, a.resume_step, choice if choice == "local" else
                    f"node {a.state_source.peer.node_id[:12]}", exc)
    return from_coordinator()


# ----------------------------------------------------------------------------- serving
class StateServer:
    """The source's side of ``FetchStageState``: which files to send to whom.

    ``assignment_of(job_id)``: this node's newest running assignment of the job (None when it
    holds none), as the coordinator last sent it; its ``state_serves`` say what may go to whom."""

    def __init__(self, *, node_id: str, state_dir: Path, assignment_of: Callable[[str], Assignment | None]) -> None:
        self.node_id = node_id
        self.state_dir = Path(state_dir)
        self.assignment_of = assignment_of

    def files(self, caller: str, job_id: str, stage: int, attempt: int, *, step: int = 0,
              replica: int = 0) -> list[tuple[str, Path]]:
        """(name, path) of this node's state of ``stage`` (as saved at the fence; ``step`` > 0: its
        periodic checkpoint of that step as ``stage``/``replica``, for its checkpoint keeper) to
        send ``caller``.
        Raises UnavailableError while this node has not switched to ``attempt``,
        PermissionDeniedError for a caller the coordinator did not send here for that state,
        NotFoundError when the files are gone."""
        if not job_id or len(job_id) > 64 or attempt < 1 or stage < 0 or step < 0 or replica < 0:
            raise InvalidRequestError("FetchStageState needs a job id, an attempt >= 1, a stage >= 0, step >= 0 "
                                      "and replica >= 0")
        a = self.assignment_of(job_id)
        if a is None or a.attempt < attempt:
            raise UnavailableError(f"node {self.node_id[:12]} runs no attempt {attempt} of job {job_id} yet; retry")
        if a.attempt > attempt:
            raise PermissionDeniedError(f"attempt {attempt} of job {job_id} is over (this node is at {a.attempt})")
        if step > 0:
            return self._checkpoint_files(a, caller, stage, replica, step)
        serve = next((s for s in a.state_serves if s.stage == stage and s.step == a.resume_step), None)
        if serve is None or caller not in serve.node_ids:
            raise PermissionDeniedError(f"node {caller[:12]} was not assigned to copy stage {stage}'s state of job "
                                        f"{job_id} attempt {attempt} from node {self.node_id[:12]}")
        d = local_state_dir(self.state_dir, job_id, stage, a.resume_step)
        if d is None:
            raise NotFoundError(f"node {self.node_id[:12]} no longer holds stage {stage}'s state at step "
                                f"{a.resume_step}; fetch it from the coordinator")
        log.info("sending stage state job=%s stage=%d step=%d to=%s", job_id, stage, a.resume_step, caller[:12])
        return [(n, d / n) for n in STATE_FILES]

    def _checkpoint_files(self, a: Assignment, caller: str, stage: int, replica: int, step: int) -> list[tuple[str, Path]]:
        """The keeper's fetch of this worker's checkpoint at ``step`` (node/training/kept.py)."""
        if (stage, replica) != (a.stage, a.replica) or a.checkpoint_keeper is None \
                or caller != a.checkpoint_keeper.node_id:
            raise PermissionDeniedError(f"node {caller[:12]} is not the checkpoint keeper the coordinator named "
                                        f"for stage {stage} replica {replica} of job {a.job_id} on node "
                                        f"{self.node_id[:12]}")
        d = self.state_dir / "training" / a.job_id / f"stage-{stage}-r{replica}" / f"step-{step:08d}"
        # meta.json is written last (node/training/checkpoints.py): both tensor files are complete
        if not all((d / n).is_file() for n in (*STATE_FILES, "meta.json")):
            raise UnavailableError(f"node {self.node_id[:12]} has not saved step {step} of stage {stage} (yet); retry")
        log.info("sending checkpoint copy job=%s stage=%d step=%d to keeper=%s", a.job_id, stage, step, caller[:12])
        return [(n, d / n) for n in STATE_FILES]
