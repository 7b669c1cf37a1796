"""Where the status page reads jobs from: the jobs plugin, when it is installed.

The jobs plugin (:mod:`coordinator.jobs`) owns ``/api/jobs``; the page fetches that route. This
module gives ``/metrics`` and ``/api/plan`` the same records in-process. Without the plugin both
answer "no jobs", which the page and the metrics handle.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


def _jobs_service(app: Any) -> Any:
    return getattr(app, "jobs", None)


def jobs_json(app: Any) -> list[dict[str, Any]]:
    """The job records as ``/api/jobs`` lists them; [] without the jobs plugin or on its error."""
    service = _jobs_service(app)
    if service is None:
        return []
    for name in ("jobs_json", "list_json"):
        fn = getattr(service, name, None)
        if callable(fn):
            try:
                out = fn()
            except Exception:  # noqa: BLE001 -- the status page must outlive a broken plugin
                log.exception("jobs plugin failed to list jobs")
                return []
            if isinstance(out, Mapping):
                out = out.get("jobs", [])
            return [dict(j) for j in out if isinstance(j, Mapping)]
    return []


def running_job_plan(app: Any) -> tuple[str, dict[str, Any]] | None:
    """(job id, Plan JSON) of the first running job that has a plan, else None."""
    for job in jobs_json(app):
        plan = job.get("plan")
        if job.get("state") == "running" and isinstance(plan, Mapping) and plan.get("stages"):
            return str(job.get("id")), dict(plan)
    return None
