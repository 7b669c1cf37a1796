"""Prometheus text exposition (format 0.0.4) of the swarm's state.

Pure: :func:`render_metrics` takes the same JSON-shaped records the HTTP API serves (node
dicts of :func:`swarm.membership.node_json`, job dicts of :class:`swarm.job_detail.JobDetail`,
plan dicts) and returns the text; it reads only keys those records define. Written by hand instead of with prometheus_client's
registry because every scrape is a fresh snapshot of the coordinator's state (no process-wide
counters to keep), and the format is small: ``# HELP`` / ``# TYPE`` lines, then one sample per
line with escaped label values.

Families (all labels are ids, never free text, except ``swarm_node_info``):

- ``swarm_nodes{state}``: nodes known to the coordinator, by state (online, lost, left).
- ``swarm_node_info{node,name,device,device_name,state}``: 1 per node, to join names onto ids.
- ``swarm_node_up{node}``, ``swarm_node_heartbeat_age_seconds{node}``,
  ``swarm_node_tflops{node}``, ``swarm_node_memory_bytes{node}``,
  ``swarm_node_memory_bandwidth_bytes_per_second{node}`` (as measured by the node; absent when not).
- ``swarm_node_sent_bytes_total{node}``, ``swarm_node_received_bytes_total{node}``: bytes on the
  wire as the node reports them (counters: they reset when a node restarts).
- ``swarm_jobs{state}``, ``swarm_job_progress_ratio{job}``, ``swarm_job_step{job}``,
  ``swarm_job_step_time_seconds{job}``, ``swarm_job_tokens_per_second{job}``, ``swarm_job_loss{job}``,
  ``swarm_job_sent_bytes_total{job}``, ``swarm_job_compression_saved_bytes_total{job}``,
  ``swarm_job_worker_sent_bytes_total{job,node,stage,replica}``.
- ``swarm_plan_predicted_step_seconds{part}``: the current plan's predicted step time and its
  breakdown (compute, pipeline, data_parallel, total).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from swarm.job_detail import JOB_DETAIL_KEYS

from coordinator.web.sources import worker_traffic

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

NODE_STATES = ("online", "lost", "left")
JOB_STATES = ("pending", "running", "succeeded", "failed", "cancelled")


def pick(record: Mapping[str, Any] | None, key: str) -> Any:
    """``record[key]`` of a node record (:func:`swarm.membership.node_json`), else the same key of
    its ``metrics`` (the values the node sent with its last heartbeat); None when neither has a
    non-None value."""
    if not isinstance(record, Mapping):
        return None
    for sub in (record, record.get("metrics")):
        if isinstance(sub, Mapping) and sub.get(key) is not None:
            return sub[key]
    return None


def job_value(job: Mapping[str, Any], key: str) -> Any:
    """``job[key]`` of a job detail record; ``key`` must be a :class:`~swarm.job_detail.JobDetail` field."""
    assert key in JOB_DETAIL_KEYS, f"{key!r} is not a JobDetail key"
    return job.get(key)


def as_number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (bools and strings are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def escape_label_value(value: str) -> str:
    """Escape a label value: backslash, double quote and line feed, per the text format."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """Escape HELP text: backslash and line feed."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, NaN and infinities spelled as Prometheus does."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


@dataclass(slots=True)
class MetricFamily:
    """One metric family being built: name, type, help and its samples."""

    name: str
    kind: str  # gauge | counter
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float | None, **labels: Any) -> None:
        """Add a sample; a missing (None) value is skipped rather than exported as 0."""
        if value is None:
            return
        self.samples.append(({k: "" if v is None else str(v) for k, v in labels.items()}, float(value)))

    def render(self) -> list[str]:
        sample_name = self.name
        lines = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for labels, value in self.samples:
            if labels:
                body = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items())
                lines.append(f"{sample_name}{{{body}}} {format_value(value)}")
            else:
                lines.append(f"{sample_name} {format_value(value)}")
        return lines


def _node_families(nodes: Sequence[Mapping[str, Any]]) -> list[MetricFamily]:
    by_state = MetricFamily("swarm_nodes", "gauge", "Nodes known to the coordinator, by state.")
    info = MetricFamily("swarm_node_info", "gauge", "Always 1; labels carry each node's name, device and state.")
    up = MetricFamily("swarm_node_up", "gauge", "1 if the node is online (heartbeating), else 0.")
    age = MetricFamily("swarm_node_heartbeat_age_seconds", "gauge", "Seconds since the node's last heartbeat.")
    tflops = MetricFamily("swarm_node_tflops", "gauge", "Measured dense matmul TFLOPS of the node.")
    memory = MetricFamily("swarm_node_memory_bytes", "gauge", "Accelerator memory of the node in bytes.")
    mem_bw = MetricFamily("swarm_node_memory_bandwidth_bytes_per_second", "gauge",
                          "Device memory bandwidth the node measured at start (bytes/s).")
    sent = MetricFamily("swarm_node_sent_bytes_total", "counter", "Bytes the node has sent to peers, as it reports.")
    received = MetricFamily(
        "swarm_node_received_bytes_total", "counter", "Bytes the node has received from peers, as it reports."
    )
    counts = dict.fromkeys(NODE_STATES, 0)
    for node in nodes:
        node_id = str(pick(node, "id") or "")
        if not node_id:
            continue
        state = str(pick(node, "state") or "unknown")
        counts[state] = counts.get(state, 0) + 1
        device = pick(node, "device")
        info.add(1, node=node_id, name=pick(node, "name") or "", device=device or "",
                 device_name=pick(node, "device_name") or "", state=state)
        up.add(1 if state == "online" else 0, node=node_id)
        age.add(as_number(pick(node, "last_seen_s")), node=node_id)
        tflops.add(as_number(pick(node, "tflops")), node=node_id)
        memory.add(as_number(pick(node, "memory_bytes")), node=node_id)
        mem_bw.add(as_number(pick(node, "mem_bandwidth_Bps")), node=node_id)
        sent.add(as_number(pick(node, "bytes_sent")), node=node_id)
        received.add(as_number(pick(node, "bytes_received")), node=node_id)
    for state, count in counts.items():
        by_state.add(count, state=state)
    return [by_state, info, up, age, tflops, memory, mem_bw, sent, received]


def _job_families(jobs: Sequence[Mapping[str, Any]]) -> list[MetricFamily]:
    by_state = MetricFamily("swarm_jobs", "gauge", "Jobs stored by the coordinator, by state.")
    progress = MetricFamily("swarm_job_progress_ratio", "gauge", "Fraction of the job's steps done (0 to 1).")
    step = MetricFamily("swarm_job_step", "gauge", "Last completed step of the job (numbered from 0).")
    step_time = MetricFamily("swarm_job_step_time_seconds", "gauge", "Wall time of the job's last step in seconds.")
    tps = MetricFamily("swarm_job_tokens_per_second", "gauge", "Training throughput of the job, tokens per second.")
    loss = MetricFamily("swarm_job_loss", "gauge", "Last reported training loss of the job.")
    sent = MetricFamily("swarm_job_sent_bytes_total", "counter", "Bytes the job's stages sent between nodes.")
    saved = MetricFamily(
        "swarm_job_compression_saved_bytes_total", "counter", "Bytes the job did not send thanks to compression."
    )
    worker_sent = MetricFamily(
        "swarm_job_worker_sent_bytes_total", "counter",
        "Bytes a job's stage worker sent on the wire (after compression), by the node running it.",
    )
    counts = dict.fromkeys(JOB_STATES, 0)
    for job in jobs:
        if not isinstance(job, Mapping):
            continue
        job_id = str(job_value(job, "id") or "")
        if not job_id:
            continue
        state = str(job_value(job, "state") or "unknown")
        counts[state] = counts.get(state, 0) + 1
        step_now = as_number(job_value(job, "step"))
        total = as_number(job_value(job, "total_steps"))
        ratio = None
        if step_now is not None and total:
            ratio = (step_now + 1) / total  # steps are numbered from 0: step k means k + 1 done
        if ratio is None and state == "succeeded":
            ratio = 1.0
        progress.add(None if ratio is None else min(1.0, max(0.0, ratio)), job=job_id)
        step.add(step_now, job=job_id)
        seconds = None
        history = job_value(job, "progress")  # per-step history, oldest first
        if isinstance(history, list) and history and isinstance(history[-1], Mapping):
            seconds = as_number(history[-1].get("step_s"))
        step_time.add(seconds, job=job_id)
        tps.add(as_number(job_value(job, "tokens_per_s")), job=job_id)
        loss.add(as_number(job_value(job, "loss")), job=job_id)
        sent.add(as_number(job_value(job, "bytes_sent")), job=job_id)
        saved.add(as_number(job_value(job, "bytes_saved")), job=job_id)
        for w in worker_traffic(job):
            worker_sent.add(as_number(w["bytes_sent"]), job=job_id, node=w["node_id"], stage=w["stage"],
                            replica=w["replica"])
    for state, count in counts.items():
        by_state.add(count, state=state)
    return [by_state, progress, step, step_time, tps, loss, sent, saved, worker_sent]


def plan_breakdown_s(plan: Mapping[str, Any] | None) -> dict[str, float]:
    """The predicted step time of a plan (``swarm.scheduling.Plan.to_json`` form) split into parts.

    ``Plan`` costs are ``cost_s = compute_s + dp_s + 2 * pp_s``: the pipeline term counts the
    forward activations and the backward gradients, so ``pipeline`` here is ``2 * pp_s``.
    Returns seconds by part (compute, pipeline, data_parallel, total); missing parts are left out.
    """
    if not isinstance(plan, Mapping):
        return {}
    pp_s = as_number(plan.get("pp_s"))
    parts = {
        "compute": as_number(plan.get("compute_s")),
        "pipeline": None if pp_s is None else 2.0 * pp_s,
        "data_parallel": as_number(plan.get("dp_s")),
        "total": as_number(plan.get("cost_s")),
    }
    return {k: v for k, v in parts.items() if v is not None and math.isfinite(v)}


def render_metrics(
    *,
    nodes: Iterable[Mapping[str, Any]],
    jobs: Iterable[Mapping[str, Any]] = (),
    plan: Mapping[str, Any] | None = None,
    plan_source: str = "none",
) -> str:
    """The whole exposition text for one scrape; ends with a newline as the format requires."""
    families = _node_families(list(nodes)) + _job_families(list(jobs))
    predicted = MetricFamily(
        "swarm_plan_predicted_step_seconds", "gauge", "Predicted step time of the current plan, by part."
    )
    for part, seconds in plan_breakdown_s(plan).items():
        predicted.add(seconds, part=part, source=plan_source)
    families.append(predicted)
    lines: list[str] = []
    for family in families:
        lines.extend(family.render())
    return "\n".join(lines) + "\n"
