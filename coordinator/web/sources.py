"""Where the status page reads jobs from: the jobs plugin's service, ``host.services.jobs``
(:class:`coordinator.services.JobsService`), when that plugin is installed.

The page itself fetches the jobs plugin's ``/api/jobs`` routes; this module gives ``/metrics``
and ``/api/plan`` the same records in-process (:class:`swarm.job_detail.JobDetail`, in the JSON
form of ``/api/jobs/{id}``). These calls read SQLite: run them in a worker thread. Without the
plugin both answer "no jobs", which the page and the metrics handle.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from coordinator.plugins import CoordinatorHost

log = logging.getLogger(__name__)

MAX_JOBS = 200  # newest first; /api/jobs lists as many


def jobs_json(host: CoordinatorHost, *, states: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Job details (newest first, ``JobDetail.to_json`` form); [] without the jobs plugin or when it fails."""
    service = host.services.jobs
    if service is None:
        return []
    try:
        return [detail.to_json() for detail in service.job_details(limit=MAX_JOBS, states=states)]
    except Exception:  # noqa: BLE001 -- the status page must outlive a broken plugin
        log.exception("reading jobs from the jobs plugin failed")
        return []


def worker_traffic(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Bytes each stage worker of a job reported sending, joined to the node that runs it.

    From the jobs plugin's detail JSON: ``assignments`` ({node_id, stage, replica}) and
    ``workers`` (per (stage, replica): summed ``bytes_sent`` and ``bytes_raw``, the size before
    compression; when the plugin also gives ``bytes_forward``/``bytes_backward``, the split of
    ``bytes_sent`` by direction, ``bytes_received`` is derived, else None). Workers without a
    current assignment are left out.
    """
    assignments = job.get("assignments")
    workers = job.get("workers")
    if not isinstance(assignments, list) or not isinstance(workers, list):
        return []
    by_slot = {}
    for w in workers:
        if isinstance(w, Mapping):
            by_slot[(w.get("stage"), w.get("replica"))] = w
    def direction(slot, key: str) -> float | None:
        v = by_slot.get(slot, {}).get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    out = []
    for a in assignments:
        if not isinstance(a, Mapping):
            continue
        stage, replica = a.get("stage"), a.get("replica")
        w = by_slot.get((stage, replica))
        if w is None:
            continue
        received = None
        if isinstance(stage, int) and direction((stage, replica), "bytes_forward") is not None:
            # Pipeline r runs through replica r of every stage: this worker receives the
            # activations stage - 1 sends forward and the gradients stage + 1 sends backward.
            received = (direction((stage - 1, replica), "bytes_forward") or 0.0) + (
                direction((stage + 1, replica), "bytes_backward") or 0.0)
        out.append({"node_id": str(a.get("node_id", "")), "stage": stage, "replica": replica,
                    "bytes_sent": w.get("bytes_sent"), "bytes_raw": w.get("bytes_raw"), "step": w.get("step"),
                    "bytes_received": received})
    return out


def running_job(host: CoordinatorHost) -> dict[str, Any] | None:
    """The detail JSON of the newest running job that has a plan, else None."""
    for job in jobs_json(host, states=("running",)):
        plan = job.get("plan")
        if job.get("state") == "running" and isinstance(plan, Mapping) and plan.get("stages"):
            return job
    return None
