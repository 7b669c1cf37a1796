"""Scoped credentials end to end with real processes: the READY line's three tokens, the status
page URL a browser opens, the CLI with each token, and ``swarm-coordinator rotate-token`` against
a running coordinator (old token refused at once, the node's session kept)."""

from __future__ import annotations

import http.cookiejar
import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from swarm import certs
from tests.helpers.procs import child_env, coordinator_proc, node_proc, wait_until

pytestmark = pytest.mark.multiproc


def _swarm(*args: str, token: str, address: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swarm.cli", *args, "--coordinator", address, "--token", token],
                          capture_output=True, text=True, timeout=60, env=child_env())


@pytest.mark.timeout(120)
def test_tokens_page_cli_and_rotation_with_real_processes(tmp_path):
    with coordinator_proc(tmp_path / "coord") as coord, node_proc(coord, tmp_path / "n0") as n0:
        tokens = (coord.token, coord.admin_token, coord.read_token)
        assert len(set(tokens)) == 3 and len({certs.parse_token(t).fingerprint for t in tokens}) == 1
        wait_until(lambda: [n.state for n in coord.snapshot().nodes] == ["online"], 30, message="node online")
        # HTTP: nothing without a token; Bearer as Prometheus sends it
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(coord.http_url + "/api/nodes", timeout=10)
        assert info.value.code == 401 and "read_token=" in json.loads(info.value.read())["error"]["message"]
        assert coord.get_json("/api/nodes")["nodes"][0]["id"] == n0.node_id
        # the printed status page URL: the browser gets a cookie and lands on / without the token
        assert coord.status_page == f"{coord.http_url}/?token={coord.read_token}"
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        with opener.open(coord.status_page, timeout=10) as resp:
            assert resp.status == 200 and resp.geturl() == coord.http_url + "/"
        with opener.open(coord.http_url + "/api/nodes", timeout=10) as resp:
            assert json.loads(resp.read())["nodes"][0]["id"] == n0.node_id
        # the CLI: the join token reads nothing, the read token reads, only the admin token changes
        out = _swarm("status", "--json", token=coord.token, address=coord.address)
        assert out.returncode != 0 and "read token" in out.stderr
        out = _swarm("status", "--json", token=coord.read_token, address=coord.address)
        assert out.returncode == 0, out.stderr
        out = _swarm("cancel", "0123456789ab", token=coord.read_token, address=coord.address)
        assert out.returncode != 0 and "admin_token=" in out.stderr
        out = _swarm("cancel", "0123456789ab", token=coord.admin_token, address=coord.address)
        assert out.returncode != 0 and "no job" in out.stderr  # past the check: the job does not exist
        # rotation on the running coordinator's state dir
        rot = subprocess.run([sys.executable, "-m", "coordinator.cli", "rotate-token", "--state-dir",
                              str(coord.state_dir), "--kind", "admin"], capture_output=True, text=True, timeout=60,
                             env=child_env())
        assert rot.returncode == 0, rot.stderr
        new_admin = rot.stdout.strip()
        assert new_admin != coord.admin_token and (coord.state_dir / "admin_token").read_text().strip() == new_admin
        out = _swarm("cancel", "0123456789ab", token=coord.admin_token, address=coord.address)
        assert out.returncode != 0 and "token given is wrong" in out.stderr
        out = _swarm("cancel", "0123456789ab", token=new_admin, address=coord.address)
        assert out.returncode != 0 and "no job" in out.stderr
        rot = subprocess.run([sys.executable, "-m", "coordinator.cli", "rotate-token", "--state-dir",
                              str(coord.state_dir), "--kind", "join"], capture_output=True, text=True, timeout=60,
                             env=child_env())
        assert rot.returncode == 0, rot.stderr
        seen = coord.snapshot().nodes[0].last_seen_at_s  # the node registered before keeps heartbeating
        wait_until(lambda: coord.snapshot().nodes[0].last_seen_at_s > seen, 15, message="heartbeats after rotation")
        assert coord.snapshot().nodes[0].state == "online"
