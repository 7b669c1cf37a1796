"""Who may read the HTTP port (issue 11, scoped credentials), against an in-process coordinator:
``/api/*``, ``/metrics`` and the page need the read or admin token (Bearer, or the cookie a
browser gets from ``/?token=...``) unless ``--public-status``; public answers never carry peer
addresses or job assignments; ``/v1`` takes API keys when configured, else the read token."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.integration.web.web_helpers import Coordinator, report_steps, start_coordinator, start_job

pytestmark = pytest.mark.timeout(60)
PLUGINS = ("coordinator.web", "coordinator.jobs", "coordinator.inference")


@pytest.fixture
def private(tmp_path: Path) -> Iterator[Coordinator]:
    c = start_coordinator(tmp_path, PLUGINS)
    try:
        yield c
    finally:
        c.app.stop(grace_s=0.1)


@pytest.fixture
def public(tmp_path: Path) -> Iterator[Coordinator]:
    c = start_coordinator(tmp_path, PLUGINS, public_status=True)
    try:
        yield c
    finally:
        c.app.stop(grace_s=0.1)


def _error(body: bytes) -> str:
    return json.loads(body)["error"]["message"]


def test_api_and_metrics_need_the_read_or_admin_token(private: Coordinator) -> None:
    c = private
    c.add_node(0)
    for path in ("/api/nodes", "/api/network", "/api/plan", "/api/jobs", "/metrics"):
        status, headers, body = c.get(path, token="")
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Bearer")
        message = _error(body)
        assert 'Authorization: Bearer READ_TOKEN' in message and "read_token=" in message, message
        assert c.get(path, token="swarm1." + "0" * 64 + ".wrong-secret-123456")[0] == 401
        status, _, body = c.get(path, token=c.app.join_token)  # volunteers hold it: it reads nothing
        assert status == 403 and "join token lets nodes join" in _error(body)
        assert c.get(path)[0] == 200, path  # the read token (web_helpers' default)
        assert c.get(path, token=c.app.admin_token)[0] == 200, path
    status, _, body = c.get("/api/nodes")
    assert json.loads(body)["nodes"][0]["peer_address"] == "127.0.0.1:20000"  # readers see addresses
    status, headers, body = c.get("/metrics")
    assert headers["Content-Type"].startswith("text/plain") and b"swarm_nodes" in body
    assert c.get("/static/app.js", token="")[0] == 200  # the page's own code is no secret
    assert c.get("/no-such-path", token="")[0] == 401  # unknown paths are not an oracle either


def test_browser_trades_the_token_in_the_url_for_a_strict_cookie(private: Coordinator) -> None:
    c = private

    async def go():
        jar = aiohttp.CookieJar(unsafe=True)  # 127.0.0.1 is an IP address
        async with aiohttp.ClientSession(cookie_jar=jar) as s:
            async with s.get(c.url + "/", headers={"Accept": "text/html"}) as r:
                assert r.status == 401 and r.content_type == "text/html"
                assert "?token=" in await r.text()  # says which address to open
            async with s.get(f"{c.url}/?token=not-a-token", allow_redirects=False) as r:
                assert r.status == 401 and "Set-Cookie" not in r.headers
            async with s.get(f"{c.url}/?token={c.app.join_token}", allow_redirects=False) as r:
                assert r.status == 403 and "Set-Cookie" not in r.headers
            async with s.get(f"{c.url}/?token={c.app.read_token}&poll_ms=500", allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == "/?poll_ms=500"  # the token leaves the URL
                cookie = r.headers["Set-Cookie"]
                assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
            async with s.get(c.url + "/") as r:
                assert r.status == 200 and "static/app.js" in await r.text()
            async with s.get(c.url + "/api/nodes") as r:  # what the page's fetch() sends: the cookie
                assert r.status == 200
            async with s.get(c.url + "/metrics") as r:
                assert r.status == 200
            # a rotated read token ends the cookie's power too
            from coordinator import credentials
            credentials.rotate(c.app.db, c.app.state_dir, c.app.ca.fingerprint, "read")
            async with s.get(c.url + "/api/nodes") as r:
                assert r.status == 401
                assert "swarm_token" in r.headers.get("Set-Cookie", "")  # cleared

    asyncio.run(go())


def test_public_status_reads_without_a_token_but_never_addresses_or_assignments(public: Coordinator) -> None:
    c = public
    ids = [c.add_node(i, name=f"gpu-{i}") for i in range(2)]
    job_id = start_job(c, total_steps=5)
    report_steps(c, job_id, range(2))
    # without a credential: answered, without peer addresses or who runs which stage
    status, _, body = c.get("/api/nodes", token="")
    nodes = json.loads(body)["nodes"]
    assert status == 200 and {n["id"] for n in nodes} == set(ids)
    assert all("peer_address" not in n for n in nodes) and b"127.0.0.1:2000" not in body
    status, _, body = c.get(f"/api/jobs/{job_id}", token="")
    detail = json.loads(body)
    assert status == 200 and detail["assignments"] == [] and detail["plan"] is None
    assert detail["step"] == 1 and detail["loss"] is not None  # progress stays public
    assert not any(i in body.decode() for i in ids)
    status, _, body = c.get("/api/plan", token="")
    assert status == 200 and not any(i in body.decode() for i in ids)
    status, _, body = c.get("/metrics", token="")
    assert status == 200 and b"swarm_job_step" in body and b"swarm_job_worker_sent_bytes_total{" not in body
    assert c.get("/", token="")[0] == 200
    # with the read token: everything
    status, _, body = c.get(f"/api/jobs/{job_id}")
    assert {a["node_id"] for a in json.loads(body)["assignments"]} == set(ids)
    assert b"swarm_job_worker_sent_bytes_total{" in c.get("/metrics")[2]
    assert json.loads(c.get("/api/nodes")[2])["nodes"][0]["peer_address"].startswith("127.0.0.1:")
    # /v1 spends volunteers' compute: never public
    assert c.get("/v1/models", token="")[0] == 401


def test_v1_takes_the_read_token_without_api_keys(private: Coordinator) -> None:
    c = private
    status, _, body = c.get("/v1/models", token="")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert c.get("/v1/models", token=c.app.join_token)[0] == 403
    assert c.get("/v1/models")[0] == 200
    assert c.get("/v1/models", token=c.app.admin_token)[0] == 200


def test_v1_takes_only_configured_api_keys_and_rereads_the_keys_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# one key per line\nfile-key-0001\n")
    c = start_coordinator(tmp_path, PLUGINS, api_keys=("flag-key-0001",), api_keys_file=keys_file)
    try:
        for key in ("flag-key-0001", "file-key-0001"):
            status, _, body = c.get("/v1/models", token=key)
            assert status == 200 and json.loads(body)["object"] == "list"
        status, _, body = c.get("/v1/models", token=c.app.read_token)  # with keys configured, keys only
        assert status == 401 and "API key" in _error(body) and json.loads(body)["error"]["code"] == "invalid_api_key"
        status, _, body = c.get("/v1/models", token="")
        assert status == 401 and "no key was given" in _error(body)
        # keys are rotated by editing the file: no restart
        keys_file.write_text("file-key-0002\n")
        assert c.get("/v1/models", token="file-key-0002")[0] == 200
        assert c.get("/v1/models", token="file-key-0001")[0] == 401
        assert c.get("/v1/models", token="flag-key-0001")[0] == 200
        assert c.get("/api/nodes")[0] == 200  # the rest of the port still takes the read token
    finally:
        c.app.stop(grace_s=0.1)
