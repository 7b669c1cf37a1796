"""Training jobs on the coordinator (plugin "coordinator.jobs").

Adds the ``Training`` gRPC service (submit/follow jobs; node assignments, data, weights,
progress, checkpoints, rendezvous), ``GET /api/jobs`` and ``GET /api/jobs/{id}``, and the job
loop (plan pending jobs, fail jobs whose nodes are lost, assemble results). State lives in the
coordinator's SQLite file and under ``state_dir/jobs/``.
"""

from __future__ import annotations

from swarm.proto.v1 import training_pb2_grpc as pb_grpc

from coordinator.jobs import http as jobs_http
from coordinator.jobs.files import UploadLimits
from coordinator.jobs.service import JobService
from coordinator.jobs.servicer import TrainingServicer
from coordinator.jobs.store import JobStore


def _service(app) -> JobService:
    svc = getattr(app, "jobs", None)
    if svc is None:
        limits = UploadLimits(max_model_params=getattr(app.config, "max_model_params", UploadLimits.max_model_params))
        svc = JobService(store=JobStore(app.db, app.clock), state_dir=app.state_dir, registry=app.registry,
                         network=app.network, clock=app.clock, limits=limits)
        app.jobs = svc
    return svc


def install_grpc(server, app) -> None:
    pb_grpc.add_TrainingServicer_to_server(TrainingServicer(app, _service(app)), server)


def install_http(web_app, app) -> None:
    jobs_http.install(web_app, _service(app))


def start(app) -> None:
    _service(app).start()


def stop(app) -> None:
    svc = getattr(app, "jobs", None)
    if svc is not None:
        svc.stop()
        svc.store.close()
