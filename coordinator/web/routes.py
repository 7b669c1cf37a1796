"""aiohttp handlers of the status page plugin (see :mod:`coordinator.web`)."""

from __future__ import annotations

import asyncio
import logging
import math
import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from swarm.job_detail import public_job_json
from swarm.membership import node_json

from coordinator.credentials import Access
from coordinator.http import access_of
from coordinator.plugins import CoordinatorHost
from coordinator.web import sources
from coordinator.web.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from coordinator.web.metrics import render_metrics
from coordinator.web.plan_view import OnlineNode, PlanPreview, PreviewConfig, job_plan_json, no_plan

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
_STATIC_NAME = re.compile(r"^[a-z0-9_-]+\.(js|css|html)$")

# Only our own files, only from our origin; no inline script, so injected markup cannot run.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@dataclass(slots=True)
class WebState:
    """What the plugin keeps per coordinator: the static files (read once) and the plan cache."""

    app: CoordinatorHost
    files: dict[str, tuple[bytes, str]]
    preview: PlanPreview


STATE_KEY = web.AppKey("swarm_web_state", WebState)


def load_static_files(directory: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, content type) for every servable file of ``directory``."""
    files = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and _STATIC_NAME.match(path.name):
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype.endswith("javascript"):
                ctype += "; charset=utf-8"
            files[path.name] = (path.read_bytes(), ctype)
    return files


def _state(request: web.Request) -> WebState:
    return request.app[STATE_KEY]


async def page(request: web.Request) -> web.Response:
    body, ctype = _state(request).files["index.html"]
    headers = dict(COMMON_HEADERS)
    headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    headers["Cache-Control"] = "no-cache"
    return web.Response(body=body, headers=headers, content_type=ctype.split(";")[0], charset="utf-8")


async def static_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    entry = _state(request).files.get(name) if _STATIC_NAME.match(name) else None
    if entry is None:
        raise web.HTTPNotFound(text=f"no static file {name!r}")
    body, ctype = entry
    headers = dict(COMMON_HEADERS)
    headers["Cache-Control"] = "no-cache"
    return web.Response(body=body, headers=headers, content_type=ctype.split(";")[0],
                        charset="utf-8" if "charset" in ctype else None)


def _online_nodes(app: CoordinatorHost) -> list[OnlineNode]:
    out = []
    for n in app.registry.snapshot():
        if n.state != "online":
            continue
        out.append(OnlineNode(id=n.id, name=n.name, tflops=float(n.planning_tflops),
                              memory_bytes=int(n.hardware.memory_bytes)))
    return out


def _matrices(app: CoordinatorHost):
    def get(ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        delay, bandwidth, _measured = app.network.matrix(ids)
        return delay, bandwidth

    return get


async def plan_json(state: WebState, access: Access = Access.FULL) -> dict[str, Any]:
    """The /api/plan answer (also used by /metrics). A running job's plan says which node runs
    which stage: PUBLIC callers get no plan while a job runs."""
    app = state.app
    names = {n.id: n.name for n in app.registry.snapshot()}
    loop = asyncio.get_running_loop()
    job = await loop.run_in_executor(None, sources.running_job, app)
    if job is not None and access is not Access.FULL:
        return no_plan(f"job {job.get('id')} is running; its plan is shown with the read token only")
    if job is not None:
        out = job_plan_json(str(job.get("id")), job["plan"], names)
        out["traffic"] = sources.worker_traffic(job)
        return out
    nodes = _online_nodes(app)
    if not nodes:
        return no_plan("no online nodes to plan over", names=names)
    out = dict(await state.preview.get(nodes, _matrices(app)))
    out["names"] = names
    return out


async def api_plan(request: web.Request) -> web.Response:
    try:
        body = await plan_json(_state(request), access_of(request))
    except Exception:  # noqa: BLE001 -- the page must keep working when planning breaks
        log.exception("building /api/plan failed")
        body = no_plan("the coordinator failed to build a plan; see its log")
    return web.json_response(body, dumps=_dumps, headers=COMMON_HEADERS)


async def metrics(request: web.Request) -> web.Response:
    state = _state(request)
    app = state.app
    now = app.clock.time()
    access = access_of(request)
    nodes = [node_json(n, now) for n in app.registry.snapshot()]
    jobs = await asyncio.get_running_loop().run_in_executor(None, sources.jobs_json, app)
    if access is not Access.FULL:  # no peer addresses (not rendered anyway), no worker placement
        nodes = [{k: v for k, v in n.items() if k != "peer_address"} for n in nodes]
        jobs = [public_job_json(j) for j in jobs]
    try:
        plan = await plan_json(state, access)
    except Exception:  # noqa: BLE001 -- metrics without the plan beat no metrics
        log.exception("plan for /metrics failed")
        plan = no_plan("error")
    text = render_metrics(nodes=nodes, jobs=jobs, plan=plan.get("plan"), plan_source=plan.get("source", "none"))
    return web.Response(text=text, headers={**COMMON_HEADERS, "Content-Type": METRICS_CONTENT_TYPE})


def _clean(value: Any) -> Any:
    """JSON has no NaN/Infinity: turn them into null (browsers' JSON.parse rejects them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(_clean(obj), allow_nan=False, default=str)


def install_http(web_app: web.Application, app: CoordinatorHost, *, preview_config: PreviewConfig | None = None) -> None:
    """Add the page, its static files, ``/api/plan`` and ``/metrics`` to the coordinator's HTTP app."""
    web_app[STATE_KEY] = WebState(app=app, files=load_static_files(), preview=PlanPreview(app.clock, preview_config))
    web_app.router.add_get("/", page)
    web_app.router.add_get("/static/{name}", static_file)
    web_app.router.add_get("/api/plan", api_plan)
    web_app.router.add_get("/metrics", metrics)
