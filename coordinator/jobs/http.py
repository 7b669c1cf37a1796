"""HTTP JSON API of training jobs: ``GET /api/jobs`` and ``GET /api/jobs/{id}``.

Both answer :class:`swarm.job_detail.JobDetail` records: ``/api/jobs`` lists jobs (newest first)
with their summary (``JobDetail.summary_json``); ``/api/jobs/{id}`` adds the plan,
assignments, per-step progress history (loss, tokens/s, bytes sent and saved by compression,
time split) and checkpoints. Handlers run the SQLite reads in the default executor. Callers
without a read credential (``--public-status``) get them without assignments
(:func:`swarm.job_detail.public_job_json`).
"""

from __future__ import annotations

import asyncio
import json
import re

from aiohttp import web

from swarm.errors import NotFoundError
from swarm.job_detail import public_job_json

from coordinator.credentials import Access
from coordinator.http import access_of

_JOB_ID = re.compile(r"^[0-9a-f]{1,64}$")


def _dumps(obj) -> str:
    # NaN/Inf are not JSON: show them as null
    def clean(x):
        if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj))


def install(web_app: web.Application, service) -> None:
    async def list_jobs(request: web.Request) -> web.Response:
        def work():
            return [detail.summary_json() for detail in service.job_details(limit=200)]

        jobs = await asyncio.get_running_loop().run_in_executor(None, work)
        if access_of(request) is not Access.FULL:
            jobs = [public_job_json(j) for j in jobs]
        return web.Response(text=_dumps({"jobs": jobs}), content_type="application/json")

    async def get_job(request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        if not _JOB_ID.match(job_id):
            return web.json_response({"error": "malformed job id"}, status=400)

        def work():
            return service.detail(service.store.get(job_id))

        try:
            detail = await asyncio.get_running_loop().run_in_executor(None, work)
        except NotFoundError as exc:
            return web.json_response({"error": str(exc)}, status=404)
        if access_of(request) is not Access.FULL:
            detail = public_job_json(detail)
        return web.Response(text=_dumps(detail), content_type="application/json")

    web_app.router.add_get("/api/jobs", list_jobs)
    web_app.router.add_get("/api/jobs/{job_id}", get_job)
