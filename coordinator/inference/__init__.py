"""Coordinator plugin: serve models over the swarm (gRPC gateway + OpenAI-compatible HTTP API)."""

from __future__ import annotations

import logging

from swarm.proto.v1 import inference_pb2_grpc as pb_grpc

from coordinator.inference.engine import InferenceEngine
from coordinator.inference.openai_api import OpenAIApi
from coordinator.inference.servicer import InferenceGatewayServicer
from coordinator.inference.store import ModelStore

log = logging.getLogger(__name__)

_state: dict[int, dict] = {}


def _get(app) -> dict:
    st = _state.get(id(app))
    if st is None:
        store = ModelStore(app.db, app.state_dir)
        st = {"store": store, "engine": InferenceEngine(app, store)}
        _state[id(app)] = st
        app.inference = st["engine"]
    return st


def install_grpc(server, app) -> None:
    st = _get(app)
    pb_grpc.add_InferenceGatewayServicer_to_server(InferenceGatewayServicer(app, st["engine"], st["store"]), server)


def install_http(web_app, app) -> None:
    OpenAIApi(_get(app)["engine"]).install(web_app)


def start(app) -> None:
    st = _get(app)
    # models served before a restart: remembered, re-placed on demand by `swarm serve` again
    for rec in st["store"].all():
        if rec.state != "failed":
            st["store"].set_state(rec.name, "stopped", "the coordinator restarted; run `swarm serve` again")


def stop(app) -> None:
    st = _state.pop(id(app), None)
    if st is not None:
        st["engine"].close()
        st["store"].close()
