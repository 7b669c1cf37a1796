"""The status page's HTTP side against a real in-process coordinator: page, static files,
/api/plan, /metrics, read-only-ness, hostile names and a 200-node swarm."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarm.membership import Link

from coordinator.web.routes import CONTENT_SECURITY_POLICY, STATE_KEY
from tests.integration.web.web_helpers import report_steps, start_job

XSS = "<script>alert(1)</script>"


def _metrics(coordinator) -> dict:
    status, headers, body = coordinator.get("/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def _by_label(family, label: str) -> dict:
    return {s.labels[label]: s.value for s in family.samples}


def test_page_is_served_with_a_strict_content_security_policy(coordinator) -> None:
    status, headers, body = coordinator.get("/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert headers["X-Content-Type-Options"] == "nosniff"
    html = body.decode()
    assert '<script src="static/app.js"' in html and '<script src="static/minichart.js"' in html
    assert "<script>" not in html  # no inline script: the CSP would block it anyway
    for name, ctype in (("app.js", "text/javascript"), ("minichart.js", "text/javascript"),
                        ("heatmap.js", "text/javascript"), ("style.css", "text/css")):
        status, headers, body = coordinator.get(f"/static/{name}")
        assert status == 200 and headers["Content-Type"].startswith(ctype) and len(body) > 500
    # The chart library is our own and served from the package, never from a CDN.
    assert b"http://" not in coordinator.get("/static/app.js")[2].replace(b"http://www.w3.org", b"")
    for name in ("app.js", "minichart.js", "heatmap.js"):
        assert b"innerHTML" not in coordinator.get(f"/static/{name}")[2].replace(b"No innerHTML anywhere", b"")


@pytest.mark.parametrize("path", ["/static/nope.js", "/static/..%2fmetrics.py", "/static/%2e%2e%2froutes.py",
                                  "/static/../routes.py", "/static/APP.JS"])
def test_static_serves_only_its_own_files(coordinator, path: str) -> None:
    status, _, body = coordinator.get(path)
    assert status == 404
    assert b"import" not in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/", "/api/plan", "/metrics", "/static/app.js", "/api/nodes", "/api/network"])
def test_every_route_is_read_only(coordinator, method: str, path: str) -> None:
    status, _, _ = coordinator.get(path, method=method)
    assert status == 405


def test_plan_is_none_without_online_nodes(coordinator) -> None:
    status, headers, body = coordinator.get("/api/plan")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    plan = json.loads(body)
    assert plan["source"] == "none" and plan["plan"] is None and plan["reason"]


def test_metrics_node_counts_follow_liveness(coordinator) -> None:
    ids = [coordinator.add_node(i, metrics={"stage": 0, "bytes_sent": 1000 * (i + 1), "bytes_received": 7}) for i in range(3)]
    fams = _metrics(coordinator)
    assert _by_label(fams["swarm_nodes"], "state") == {"online": 3, "lost": 0, "left": 0}
    assert _by_label(fams["swarm_node_sent_bytes"], "node") == {ids[0]: 1000, ids[1]: 2000, ids[2]: 3000}

    coordinator.clock.advance(coordinator.app.config.node_timeout_s + 1)  # everyone misses heartbeats...
    coordinator.app.registry.heartbeat(ids[0])  # ...but node 0 comes back
    coordinator.app.registry.leave(ids[2])
    fams = _metrics(coordinator)
    assert _by_label(fams["swarm_nodes"], "state") == {"online": 1, "lost": 1, "left": 1}
    assert _by_label(fams["swarm_node_up"], "node") == {ids[0]: 1, ids[1]: 0, ids[2]: 0}
    assert fams["swarm_node_heartbeat_age_seconds"].samples
    assert all(s.value == 0 for s in fams["swarm_jobs"].samples)  # no jobs plugin here: zeros, not errors


def test_hostile_node_name_stays_data_in_api_and_metrics(coordinator) -> None:
    nid = coordinator.add_node(0, name=XSS)
    status, headers, body = coordinator.get("/api/nodes")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert [n["name"] for n in json.loads(body)["nodes"]] == [XSS]
    info = _metrics(coordinator)["swarm_node_info"]
    assert [(s.labels["node"], s.labels["name"]) for s in info.samples] == [(nid, XSS)]


def test_two_hundred_nodes_stay_cheap(coordinator) -> None:
    ids = [coordinator.add_node(i, metrics={"stage": i % 8}) for i in range(200)]
    now = coordinator.clock.time()
    for i in range(0, 200, 7):  # a sparse sample of measured links
        coordinator.app.network.record(Link(src=ids[i], dst=ids[(i + 1) % 200], delay_s=0.01, rtt_s=0.02,
                                            bandwidth_Bps=1e7, measured_at_s=now))
    for path in ("/api/nodes", "/api/network", "/api/plan", "/metrics"):
        start = time.monotonic()
        status, _, body = coordinator.get(path)
        assert status == 200, path
        assert time.monotonic() - start < 10.0, path
    fams = _metrics(coordinator)
    assert _by_label(fams["swarm_nodes"], "state")["online"] == 200


def test_plan_preview_is_cached_and_follows_membership(coordinator) -> None:
    ids = [coordinator.add_node(i, tflops=0.5 + i) for i in range(4)]  # unequal: predicted-iteration objective
    now = coordinator.clock.time()
    coordinator.app.network.record(Link(src=ids[0], dst=ids[1], delay_s=0.002, rtt_s=0.004, bandwidth_Bps=5e7,
                                        measured_at_s=now))
    plan = json.loads(coordinator.get("/api/plan")[2])
    assert plan["source"] == "preview", plan
    stages = plan["plan"]["stages"]
    assert stages[0]["layers"][0] == 0 and stages[-1]["layers"][1] == plan["shape"]["num_layers"]
    assert {d for s in stages for d in s["devices"]} <= set(ids)
    assert plan["assumed_links"] == 11  # 4 x 3 directed links, one measured
    assert plan["predicted"]["total_s"] > 0 and plan["predicted"]["compute_s"] > 0
    assert plan["names"][ids[0]] == "node-0"

    preview = coordinator.app.web_app[STATE_KEY].preview
    assert json.loads(coordinator.get("/api/plan")[2]) == plan
    assert preview.num_computations == 1  # the second request came from the cache

    coordinator.clock.advance(coordinator.app.config.node_timeout_s + 1)
    for nid in ids[:3]:
        coordinator.app.registry.heartbeat(nid)  # node 3 is lost now
    plan = json.loads(coordinator.get("/api/plan")[2])
    assert plan["source"] == "preview" and preview.num_computations == 2
    assert ids[3] not in {d for s in plan["plan"]["stages"] for d in s["devices"]}


def test_plan_and_metrics_of_a_running_job(coordinator_with_jobs) -> None:
    c = coordinator_with_jobs
    ids = [c.add_node(i) for i in range(2)]
    job_id = start_job(c, total_steps=10)
    plan = json.loads(c.get("/api/plan")[2])
    assert plan["source"] == "job" and plan["job_id"] == job_id
    assert {d for s in plan["plan"]["stages"] for d in s["devices"]} <= set(ids)
    report_steps(c, job_id, range(4))
    fams = _metrics(c)
    assert _by_label(fams["swarm_jobs"], "state")["running"] == 1
    assert _by_label(fams["swarm_job_step"], "job") == {job_id: 3}
    assert _by_label(fams["swarm_job_progress_ratio"], "job") == {job_id: pytest.approx(0.4)}
    assert _by_label(fams["swarm_job_step_time_seconds"], "job") == {job_id: pytest.approx(0.53)}
    assert _by_label(fams["swarm_job_tokens_per_second"], "job")[job_id] > 0
    saved = _by_label(fams["swarm_job_compression_saved_bytes"], "job")[job_id]
    assert saved == 4 * len(ids) * 150_000  # (raw - sent) summed over steps and workers
    per_worker = {s.labels["node"]: s.value for s in fams["swarm_job_worker_sent_bytes"].samples}
    assert per_worker == {nid: 4 * 50_000 for nid in ids}  # each worker sent 50 kB in each of 4 steps
    traffic = json.loads(c.get("/api/plan")[2])["traffic"]
    assert {w["node_id"]: w["bytes_sent"] for w in traffic} == per_worker
    parts = {s.labels["part"]: s.value for s in fams["swarm_plan_predicted_step_seconds"].samples}
    assert parts["total"] == pytest.approx(plan["predicted"]["total_s"])
