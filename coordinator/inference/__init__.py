"""Coordinator plugin: serve models over the swarm (gRPC gateway + OpenAI-compatible HTTP API).

Models served before a coordinator restart are re-placed once nodes are back: a background
thread per model retries placement until it succeeds or ``RESTORE_WAIT_S`` passes. Provides
``host.services.inference`` (the :class:`~coordinator.inference.engine.InferenceEngine`).
"""

from __future__ import annotations

import logging
import threading

from aiohttp import web

from swarm.errors import SwarmError
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.transport.coordinator_client import model_record

from coordinator.http import access_of
from coordinator.inference.engine import InferenceEngine
from coordinator.inference.healer import Healer
from coordinator.inference.openai_api import OpenAIApi
from coordinator.inference.servicer import InferenceGatewayServicer, model_info
from coordinator.inference.store import ModelStore
from coordinator.plugins import CoordinatorHost, CoordinatorPlugin

log = logging.getLogger(__name__)

RESTORE_WAIT_S = 300.0
RESTORE_SETTLE_S = 3.0  # node count unchanged this long before placing without an exact --stages

class InferencePlugin(CoordinatorPlugin):
    """Owns the model store, the engine and the restore threads of one coordinator."""

    def __init__(self, host: CoordinatorHost) -> None:
        self.host = host
        self.store = ModelStore(host.db, host.state_dir)
        self.engine = InferenceEngine(host, self.store)
        self.healer = Healer(self.engine)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        host.services.provide_inference(self.engine)

    def install_grpc(self, server) -> None:
        pb_grpc.add_InferenceGatewayServicer_to_server(InferenceGatewayServicer(self.host, self.engine, self.store),
                                                       server)

    def install_http(self, web_app) -> None:
        OpenAIApi(self.engine).install(web_app)
        web_app.router.add_get("/api/models", self._api_models)

    async def _api_models(self, request):
        """``GET /api/models``: what ``swarm models --json`` prints (the status page's Models); with
        public status only, no node ids or addresses (as ListModels)."""
        access = access_of(request)
        models = [model_record(model_info(self.engine, r, access)).to_json() for r in self.store.all()]
        return web.json_response({"models": models})

    def _restore(self, rec) -> None:
        """Re-place a model served before the restart once enough nodes have re-registered."""
        clock, store, engine, stop = self.host.clock, self.store, self.engine, self._stop
        p = rec.params
        need = (p.num_stages or 1) * (p.num_replicas or 1)
        deadline = clock.monotonic() + RESTORE_WAIT_S
        last_count, since = -1, clock.monotonic()
        error = ""
        while not stop.wait(1.0) and clock.monotonic() < deadline:
            count = len(self.host.registry.online())
            now = clock.monotonic()
            if count != last_count:
                last_count, since = count, now
            if count < need or (p.num_stages is None and now - since < RESTORE_SETTLE_S):
                continue
            try:
                engine.serve(rec)
                log.info("restored model=%s after the coordinator restart", rec.name)
                return
            except SwarmError as exc:
                error = str(exc)
                store.set_state(rec.name, "restoring", error)
                stop.wait(2.0)
        if not stop.is_set():
            store.set_state(rec.name, "failed", f"not restored after the coordinator restart: {error or 'no nodes'}; "
                                                "run `swarm serve` again")

    def start(self) -> None:
        self.healer.start()
        for rec in self.store.all():
            if rec.state == "failed" or not rec.dir.is_dir():
                continue
            self.store.set_state(rec.name, "restoring", "waiting for nodes after a coordinator restart")
            t = threading.Thread(target=self._restore, args=(rec,), name=f"restore-{rec.name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self.engine.close()
        self.store.close()


def create(host: CoordinatorHost) -> InferencePlugin:
    return InferencePlugin(host)
