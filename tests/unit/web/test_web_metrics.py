"""The Prometheus exposition text: parsed back with prometheus_client's own parser."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.web.metrics import (
    escape_label_value,
    format_value,
    plan_breakdown_s,
    render_metrics,
)


def _node(node_id: str, state: str, **extra) -> dict:
    rec = {
        "id": node_id,
        "name": f"name-{node_id}",
        "state": state,
        "device": "cpu",
        "device_name": "x86",
        "memory_bytes": 8 << 30,
        "tflops": 1.5,
        "last_seen_s": 0.5,
        "metrics": {"bytes_sent": 1000, "bytes_received": 2000, "stage": 0},
    }
    rec.update(extra)
    return rec


def _families(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = fam
    return out


def _samples(fam) -> dict:
    return {tuple(sorted(s.labels.items())): s.value for s in fam.samples}


def test_node_counts_by_state_include_zero_states() -> None:
    text = render_metrics(nodes=[_node("a", "online"), _node("b", "online"), _node("c", "lost")])
    fams = _families(text)
    counts = {s.labels["state"]: s.value for s in fams["swarm_nodes"].samples}
    assert counts == {"online": 2.0, "lost": 1.0, "left": 0.0}
    up = {s.labels["node"]: s.value for s in fams["swarm_node_up"].samples}
    assert up == {"a": 1.0, "b": 1.0, "c": 0.0}


def test_bytes_on_the_wire_are_counters_from_heartbeat_metrics() -> None:
    fams = _families(render_metrics(nodes=[_node("a", "online")]))
    sent = fams["swarm_node_sent_bytes"]  # the parser strips _total from counter family names
    assert sent.type == "counter"
    assert [(s.name, s.labels, s.value) for s in sent.samples] == [("swarm_node_sent_bytes_total", {"node": "a"}, 1000.0)]
    assert _samples(fams["swarm_node_received_bytes"]) == {(("node", "a"),): 2000.0}


def test_empty_swarm_still_exports_zero_counts_and_parses() -> None:
    text = render_metrics(nodes=[], jobs=[], plan=None)
    fams = _families(text)
    assert {s.labels["state"]: s.value for s in fams["swarm_nodes"].samples} == {"online": 0, "lost": 0, "left": 0}
    assert all(s.value == 0 for s in fams["swarm_jobs"].samples)
    assert text.endswith("\n")


def test_hostile_names_are_escaped_and_round_trip() -> None:
    name = 'evil"}\n\\ <script>alert(1)</script>'
    text = render_metrics(nodes=[_node("n1", "online", name=name)])
    # The raw quote/newline never reaches the text unescaped: every sample stays on one line.
    for line in text.splitlines():
        assert line.startswith("#") or line.startswith("swarm_")
    info = _families(text)["swarm_node_info"]
    assert info.samples[0].labels["name"] == name


def test_job_progress_step_time_and_savings() -> None:
    jobs = [
        # the jobs plugin's detail JSON: steps numbered from 0, per-step history under "progress"
        {"id": "j1", "state": "running", "step": 24, "total_steps": 100, "tokens_per_s": 800.0, "loss": 3.5,
         "bytes_saved": 12345, "bytes_sent": 999, "progress": [{"step": 23, "step_s": 1.5}, {"step": 24, "step_s": 1.25}]},
        {"id": "j2", "state": "succeeded", "step": None, "total_steps": 10, "progress": []},
    ]
    fams = _families(render_metrics(nodes=[], jobs=jobs))
    assert _samples(fams["swarm_job_progress_ratio"]) == {(("job", "j1"),): 0.25, (("job", "j2"),): 1.0}
    assert _samples(fams["swarm_job_step_time_seconds"]) == {(("job", "j1"),): 1.25}
    assert _samples(fams["swarm_job_tokens_per_second"]) == {(("job", "j1"),): 800.0}
    assert _samples(fams["swarm_job_compression_saved_bytes"]) == {(("job", "j1"),): 12345.0}
    states = {s.labels["state"]: s.value for s in fams["swarm_jobs"].samples}
    assert states["running"] == 1 and states["succeeded"] == 1 and states["failed"] == 0


def test_plan_breakdown_from_scheduler_json() -> None:
    plan = {"objective": "predicted_iteration", "cost_s": 10.0, "compute_s": 6.0, "dp_s": 2.0, "pp_s": 1.0,
            "stages": [], "breakdown": {"boundary_s": [1.0]}}
    assert plan_breakdown_s(plan) == {"compute": 6.0, "pipeline": 2.0, "data_parallel": 2.0, "total": 10.0}
    fams = _families(render_metrics(nodes=[], plan=plan, plan_source="preview"))
    parts = {s.labels["part"]: s.value for s in fams["swarm_plan_predicted_step_seconds"].samples}
    assert parts == {"compute": 6.0, "pipeline": 2.0, "data_parallel": 2.0, "total": 10.0}


def test_non_numbers_from_nodes_are_skipped_not_crashing() -> None:
    node = _node("a", "online", tflops="fast", memory_bytes=True, metrics={"bytes_sent": [1], "bytes_received": None})
    fams = _families(render_metrics(nodes=[node, {"name": "no id"}, "garbage"]))  # type: ignore[list-item]
    assert "swarm_node_tflops" in fams and fams["swarm_node_tflops"].samples == []
    assert fams["swarm_node_sent_bytes"].samples == []


@pytest.mark.parametrize(
    ("value", "text"),
    [(3.0, "3"), (0.25, "0.25"), (float("nan"), "NaN"), (math.inf, "+Inf"), (-math.inf, "-Inf"), (1e20, "1e+20")],
)
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text


def test_escape_label_value() -> None:
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_memory_bandwidth_is_exported_only_where_measured() -> None:
    fams = _families(render_metrics(nodes=[_node("a", "online", mem_bandwidth_Bps=2.5e10),
                                           _node("b", "online", mem_bandwidth_Bps=None)]))
    assert _samples(fams["swarm_node_memory_bandwidth_bytes_per_second"]) == {(("node", "a"),): 2.5e10}
