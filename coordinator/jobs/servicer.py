"""gRPC ``Training`` service of the coordinator: protobuf <-> :class:`JobService` calls.

User calls (SubmitJob, ResumeJob, GetJob, ListJobs, CancelJob, DownloadResult) need no node session; node
calls (PollAssignments, ReportProgress, Fetch*, UploadCheckpoint, Rendezvous) authenticate the
calling node and check it holds the part of the job it asks about.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from swarm.errors import AuthError, InvalidRequestError, NotFoundError
from swarm.model.config import ModelConfig
from swarm.proto.v1 import training_pb2 as pb
from swarm.proto.v1 import training_pb2_grpc as pb_grpc
from swarm.transport import transfer, transfer_pb
from swarm.transport.errors import grpc_errors
from swarm.transport.jobs import (job_spec_from_pb, job_spec_to_pb, keeper_to_pb, keeps_to_pb, progress_from_pb,
                                  state_serves_to_pb, state_source_to_pb)

from swarm.job_detail import public_job_json

from coordinator.credentials import Access
from coordinator.jobs import churn, files
from coordinator.jobs.checkpoint_check import check_stage_checkpoint, expected_layout
from coordinator.jobs.service import JobService
from coordinator.jobs.store import Job

log = logging.getLogger(__name__)

# optimizer.pt: what nodes before optimizer.safetensors sent (kept, never read)
CHECKPOINT_FILES = ("weights.safetensors", "optimizer.safetensors", "optimizer.pt", "meta.json")


def job_record(service: JobService, job: Job, access: Access = Access.FULL) -> pb.JobRecord:
    detail = service.detail(job)
    if access is not Access.FULL:
        detail = public_job_json(detail)
    loss = detail["loss"]
    return pb.JobRecord(
        job_id=job.id, state=job.state, reason=job.reason, spec=job_spec_to_pb(job.spec),
        created_at_s=job.created_at_s, updated_at_s=job.updated_at_s,
        step=-1 if detail["step"] is None else detail["step"], total_steps=job.total_steps,
        loss=math.nan if loss is None else loss, tokens_per_s=detail["tokens_per_s"] or 0.0,
        detail_json=json.dumps(detail, default=float),
    )


def _stream_file(path: Path, name: str):
    yield from transfer_pb.to_messages(transfer.send_files([(name, path)]), pb.FileChunk)


class TrainingServicer(pb_grpc.TrainingServicer):
    """Follows the protocol of protos/swarm/proto/v1/training.proto.

    Submitting, resuming and cancelling jobs need the coordinator's admin token in the
    ``swarm-api-token`` metadata; reading jobs and downloading results the read or admin token
    (reading without one on a ``--public-status`` coordinator: no assignments; downloads never).
    """

    def __init__(self, app, service: JobService) -> None:
        self.app = app
        self.service = service

    def _check_user(self, context) -> None:
        self.app.authenticate_user(context, "submitting or cancelling jobs")

    # -- users -----------------------------------------------------------------------------------
    @grpc_errors
    def SubmitJob(self, request_iterator, context) -> pb.JobRecord:
        self._check_user(context)
        it = iter(request_iterator)
        first = next(it, None)
        if first is None or not first.HasField("spec"):
            raise InvalidRequestError("the first SubmitJob chunk must carry the job spec")

        def rest():
            yield first
            for chunk in it:
                if chunk.HasField("spec"):
                    raise InvalidRequestError("the job spec may only be sent once, in the first chunk")
                yield chunk

        job = self.service.submit(job_spec_from_pb(first.spec), transfer_pb.from_messages(rest()))
        return job_record(self.service, job)

    @grpc_errors
    def ResumeJob(self, request, context) -> pb.JobRecord:
        self._check_user(context)
        return job_record(self.service, self.service.resume(request.job_id, job_spec_from_pb(request.spec)))

    @grpc_errors
    def GetJob(self, request, context) -> pb.JobRecord:
        access = self.app.authorize_read(context)
        return job_record(self.service, self.service.store.get(request.job_id), access)

    @grpc_errors
    def ListJobs(self, request, context) -> pb.ListJobsReply:
        access = self.app.authorize_read(context)
        limit = request.limit if 0 < request.limit <= 1000 else 100
        return pb.ListJobsReply(jobs=[job_record(self.service, j, access)
                                      for j in self.service.store.list(limit=limit)])

    @grpc_errors
    def CancelJob(self, request, context) -> pb.JobRecord:
        self._check_user(context)
        return job_record(self.service, self.service.cancel(request.job_id, request.reason[:500]))

    @grpc_errors
    def DownloadResult(self, request, context):
        if self.app.authorize_read(context) is not Access.FULL:  # a model is no status: never public
            raise AuthError("downloading a job's model needs the coordinator's read or admin token: pass --token "
                            "READ_TOKEN or set SWARM_TOKEN (read_token= in the READY line of swarm-coordinator serve)")
        _, paths = self.service.download(request.job_id)
        for path in paths:
            yield from _stream_file(path, path.name)

    # -- nodes -----------------------------------------------------------------------------------
    @grpc_errors
    def PollAssignments(self, request, context) -> pb.PollAssignmentsReply:
        node_id = self.app.authenticate_node(context)
        active, stop = self.service.assignments_for(node_id)
        out = [assignment_to_pb(job, a) for job, a in active]
        return pb.PollAssignmentsReply(assignments=out, cancelled_job_ids=stop)

    @grpc_errors
    def ReportProgress(self, request, context) -> pb.ProgressAck:
        node_id = self.app.authenticate_node(context)
        ack = self.service.report(node_id, progress_from_pb(request))
        return pb.ProgressAck(stop=ack.stop, reason=ack.reason, start=ack.start, fence=ack.fence,
                              switch_step=ack.switch_step, fence_all_live=ack.fence_all_live,
                              fence_live_members=ack.fence_live_members,
                              fence_dropped=dropped_to_pb(ack.fence_dropped))

    @grpc_errors
    def FetchJobData(self, request, context):
        node_id = self.app.authenticate_node(context)
        self.service.assignment_of(request.job_id, node_id)
        path = files.job_dir(self.service.state_dir, request.job_id) / "data.npy"
        if not path.is_file():
            raise NotFoundError(f"job {request.job_id} has no data")
        yield from _stream_file(path, "data.npy")

    @grpc_errors
    def FetchStageWeights(self, request, context):
        node_id = self.app.authenticate_node(context)
        job, a = self.service.assignment_of(request.job_id, node_id, stage=request.stage)
        jdir = files.job_dir(self.service.state_dir, job.id)
        source = f"resume-{job.resume_step}" if job.resume_step else "init"
        is_first, is_last = a["stage"] == 0, a["stage"] == a["num_stages"] - 1
        if request.optimizer_state:
            blob = files.stage_optimizer_bytes(jdir, ModelConfig.from_hf_config(job.model), a["first_layer"],
                                               a["last_layer_excl"], is_first=is_first, is_last=is_last, source=source)
            yield from transfer_pb.to_messages(transfer.send_bytes(files.OPTIMIZER_FILE, blob), pb.FileChunk)
            return
        blob = files.stage_weights_bytes(jdir, a["first_layer"], a["last_layer_excl"], is_first=is_first,
                                         is_last=is_last, source=source)
        yield from transfer_pb.to_messages(transfer.send_bytes("weights.safetensors", blob), pb.FileChunk)

    @grpc_errors
    def UploadCheckpoint(self, request_iterator, context) -> pb.CheckpointAck:
        node_id = self.app.authenticate_node(context)
        it = iter(request_iterator)
        first = next(it, None)
        if first is None or not first.HasField("header"):
            raise InvalidRequestError("the first UploadCheckpoint chunk must carry the header")
        h = first.header
        job, a = self.service.assignment_of(h.job_id, node_id, stage=h.stage, replica=h.replica)
        if job.terminal and not h.final:
            raise InvalidRequestError(f"job {job.id} is {job.state}; checkpoint not needed")
        if h.step < 0 or h.step > job.total_steps:
            raise InvalidRequestError(f"checkpoint step {h.step} outside 0..{job.total_steps}")
        self.service.check_checkpoint(job, stage=h.stage, replica=h.replica, attempt=h.attempt)
        target = files.checkpoint_dir(files.job_dir(self.service.state_dir, job.id), step=h.step, stage=h.stage,
                                      replica=h.replica)
        tmp = target.with_name(target.name + ".partial")
        limits = files.UploadLimits(max_total_bytes=self.service.limits.max_total_bytes * 3,
                                    max_file_bytes=self.service.limits.max_total_bytes * 2)
        receiver = transfer.FileReceiver(tmp, roots=("ckpt",), limits=limits)

        def items():
            yield first
            for chunk in it:
                if chunk.HasField("header"):
                    raise InvalidRequestError("a checkpoint upload carries one header")
                yield chunk

        try:
            for item in transfer_pb.from_messages(items()):
                if isinstance(item, transfer.FileHeader):
                    if item.name.removeprefix("ckpt/") not in CHECKPOINT_FILES:
                        raise InvalidRequestError(f"checkpoint file {item.name!r} not one of {CHECKPOINT_FILES}")
                    receiver.start(item)
                else:
                    receiver.write(item)
            receiver.finish()
        except BaseException:
            receiver.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:  # parsed and checked before it counts (coordinator/jobs/checkpoint_check.py)
            jdir = files.job_dir(self.service.state_dir, job.id)
            layout = expected_layout(files.stage_weights_bytes(
                jdir, a["first_layer"], a["last_layer_excl"], is_first=a["stage"] == 0,
                is_last=a["stage"] == a["num_stages"] - 1))
            check_stage_checkpoint(tmp / "ckpt", layout=layout, job_id=job.id, stage=h.stage, replica=h.replica,
                                   step=h.step)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        (tmp / "ckpt").rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.service.checkpoint_received(job.id, node_id, stage=h.stage, replica=h.replica, step=h.step,
                                             final=h.final, directory=target)
        except InvalidRequestError:  # the job ended while this was uploading: keep nothing
            shutil.rmtree(target, ignore_errors=True)
            raise
        return pb.CheckpointAck(step=h.step, bytes_received=receiver.total_bytes)

    @grpc_errors
    def Rendezvous(self, request, context) -> pb.RendezvousReply:
        node_id = self.app.authenticate_node(context)
        maddrs = self.service.rendezvous(request.job_id, node_id, request.stage, request.replica, list(request.maddrs),
                                         request.attempt)
        return pb.RendezvousReply(maddrs=maddrs, num_joined=len(maddrs))


def dropped_to_pb(dropped) -> list[pb.DroppedShare]:
    """A holder-loss fence's lost shares (churn.holder_loss) as the workers receive them."""
    return [pb.DroppedShare(node_id=d["node"], stage=d["stage"], share_index=d["share_index"],
                            share_count=d["share_count"]) for d in dropped or ()]


def assignment_to_pb(job, a: dict) -> pb.StageAssignment:
    """A stored assignment of ``job`` as the node receives it (PollAssignments)."""
    spec = job.spec.replace(steps=job.total_steps, num_stages=a["num_stages"], num_replicas=a["num_replicas"])
    peer = lambda p: pb.PeerRef(node_id=p["node_id"], address=p["address"]) if p else None  # noqa: E731
    return pb.StageAssignment(
        job_id=job.id, attempt=job.attempt, stage=a["stage"], num_stages=a["num_stages"],
        replica=a["replica"], num_replicas=a["num_replicas"], first_layer=a["first_layer"],
        last_layer_excl=a["last_layer_excl"], prev=peer(a["prev"]), next=peer(a["next"]),
        stage_replicas=[peer(p) for p in a["stage_replicas"]], spec=job_spec_to_pb(spec),
        model_config_json=json.dumps(job.model), num_samples=job.num_samples,
        dataset_key=job.dataset_key, resume_step=job.resume_step,
        fence=job.fence is not None, switch_step=(job.fence or {}).get("switch_step", 0),
        fence_all_live=churn.fence_all_live(job.fence),
        fence_live_members=churn.live_members(job.fence, job.assignments, a["stage"]) if job.fence else [],
        fence_dropped=dropped_to_pb((job.fence or {}).get("dropped")),
        verify_json=json.dumps(a.get("verify") or {}), state_source=state_source_to_pb(a.get("state_source")),
        state_serves=state_serves_to_pb(a.get("state_serves")),
        checkpoint_keeper=keeper_to_pb(a.get("checkpoint_keeper")), keeps=keeps_to_pb(a.get("keeps")),
        pipeline=a.get("pipeline", a["replica"]), has_pipeline=True, share_index=a.get("share_index", 0),
        share_count=a.get("share_count", 1), prev_holders=[peer(p) for p in a.get("prev_holders") or ()],
        next_holders=[peer(p) for p in a.get("next_holders") or ()],
    )
