"""Training jobs on the coordinator (plugin "coordinator.jobs").

Adds the ``Training`` gRPC service (submit/follow jobs; node assignments, data, weights,
progress, checkpoints, rendezvous), ``GET /api/jobs`` and ``GET /api/jobs/{id}``, and the job
loop (plan pending jobs, fail jobs whose nodes are lost, assemble results). State lives in the
coordinator's SQLite file and under ``state_dir/jobs/``. Provides ``host.services.jobs`` (the
:class:`~coordinator.jobs.service.JobService`) to other plugins.
"""

from __future__ import annotations

from swarm.proto.v1 import training_pb2_grpc as pb_grpc

from coordinator.jobs import http as jobs_http
from coordinator.jobs.files import UploadLimits
from coordinator.jobs.service import JobService
from coordinator.jobs.servicer import TrainingServicer
from coordinator.jobs.store import JobStore
from coordinator.plugins import CoordinatorHost, CoordinatorPlugin


class JobsPlugin(CoordinatorPlugin):
    def __init__(self, host: CoordinatorHost) -> None:
        self.host = host
        self.service = JobService(store=JobStore(host.db, host.clock), state_dir=host.state_dir,
                                  registry=host.registry, network=host.network, clock=host.clock,
                                  limits=UploadLimits(max_model_params=host.max_model_params),
                                  rebalance=host.rebalance, helpers=host.helpers)
        host.services.provide_jobs(self.service)

    def install_grpc(self, server) -> None:
        pb_grpc.add_TrainingServicer_to_server(TrainingServicer(self.host, self.service), server)

    def install_http(self, web_app) -> None:
        jobs_http.install(web_app, self.service)

    def start(self) -> None:
        self.service.start()

    def stop(self) -> None:
        self.service.stop()
        self.service.store.close()


def create(host: CoordinatorHost) -> JobsPlugin:
    return JobsPlugin(host)
