"""Coordinator plugin: serve models over the swarm (gRPC gateway + OpenAI-compatible HTTP API).

Models served before a coordinator restart are re-placed once nodes are back: a background
thread per model retries placement until it succeeds or ``RESTORE_WAIT_S`` passes.
"""

from __future__ import annotations

import logging
import threading

from swarm.errors import SwarmError
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc

from coordinator.inference.engine import InferenceEngine
from coordinator.inference.openai_api import OpenAIApi
from coordinator.inference.servicer import InferenceGatewayServicer
from coordinator.inference.store import ModelStore

log = logging.getLogger(__name__)

RESTORE_WAIT_S = 300.0
RESTORE_SETTLE_S = 3.0  # node count unchanged this long before placing without an exact --stages

_state: dict[int, dict] = {}


def _get(app) -> dict:
    st = _state.get(id(app))
    if st is None:
        store = ModelStore(app.db, app.state_dir)
        st = {"store": store, "engine": InferenceEngine(app, store), "stop": threading.Event(), "threads": []}
        _state[id(app)] = st
        app.inference = st["engine"]
    return st


def install_grpc(server, app) -> None:
    st = _get(app)
    pb_grpc.add_InferenceGatewayServicer_to_server(InferenceGatewayServicer(app, st["engine"], st["store"]), server)


def install_http(web_app, app) -> None:
    OpenAIApi(_get(app)["engine"]).install(web_app)


def _restore(app, st: dict, rec) -> None:
    """Re-place a model served before the restart once enough nodes have re-registered."""
    store, engine, stop = st["store"], st["engine"], st["stop"]
    p = rec.params
    need = (p.num_stages or 1) * (p.num_replicas or 1)
    deadline = app.clock.monotonic() + RESTORE_WAIT_S
    last_count, since = -1, app.clock.monotonic()
    error = ""
    while not stop.wait(1.0) and app.clock.monotonic() < deadline:
        count = len(app.registry.online())
        now = app.clock.monotonic()
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


def start(app) -> None:
    st = _get(app)
    for rec in st["store"].all():
        if rec.state == "failed" or not rec.dir.is_dir():
            continue
        st["store"].set_state(rec.name, "restoring", "waiting for nodes after a coordinator restart")
        t = threading.Thread(target=_restore, args=(app, st, rec), name=f"restore-{rec.name}", daemon=True)
        t.start()
        st["threads"].append(t)


def stop(app) -> None:
    st = _state.pop(id(app), None)
    if st is not None:
        st["stop"].set()
        for t in st["threads"]:
            t.join(timeout=5)
        st["engine"].close()
        st["store"].close()
