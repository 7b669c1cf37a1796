"""End to end: a real coordinator and three real nodes (subprocesses), the status page in
headless Chromium. The nodes appear online with their hardware, the network heatmap fills in as
the coordinator measures links, and a node killed with SIGKILL turns ``lost`` on the open page
without a reload; /metrics agrees. Screenshots: artifacts/web-e2e.png, artifacts/web-e2e-lost.png.
"""

from __future__ import annotations

import asyncio
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.chromium import find_chromium, with_browser
from tests.helpers.procs import coordinator_proc, launch_node

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
pytestmark = pytest.mark.multiproc


def _state_of(node_id: str) -> str:
    return f"(document.querySelector('tr[data-node-id=\"{node_id}\"] td.state') || {{}}).textContent"


def _node_counts(http_url: str, token: str) -> dict[str, float]:
    req = urllib.request.Request(http_url + "/metrics", headers={"Authorization": f"Bearer {token}"})  # as Prometheus
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    fam = next(f for f in text_string_to_metric_families(text) if f.name == "swarm_nodes")
    return {s.labels["state"]: s.value for s in fam.samples}


async def _hover_first_measured(page) -> str:
    """Move the mouse over the heatmap cells (row 0 first) until the tooltip shows a measured
    value; returns the tooltip text."""
    box = await page.eval("""(() => { const c = document.querySelector('#heatmap-bandwidth canvas');
        const r = c.getBoundingClientRect(); return {x: r.left, y: r.top, m: +c.dataset.margin,
        cell: +c.dataset.cell, n: Math.round((r.width - +c.dataset.margin) / +c.dataset.cell)}; })()""")
    text = ""
    for i in range(box["n"]):
        for j in range(box["n"]):
            if i == j:
                continue
            x = box["x"] + box["m"] + (j + 0.5) * box["cell"]
            y = box["y"] + box["m"] + (i + 0.5) * box["cell"]
            await page.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
            text = await page.eval("(t => t.hidden ? '' : t.textContent)(document.getElementById('heatmap-tip'))")
            if "measured " in text:
                return text
    return text


@pytest.mark.timeout(90)
def test_page_shows_real_nodes_and_a_killed_node_turns_lost(tmp_path: Path) -> None:
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium: apt-get install chromium (scripts/setup.sh installs it when run as root)")
    with ExitStack() as stack:
        coord = stack.enter_context(coordinator_proc(tmp_path / "coord"))
        # Start the three nodes at once (each imports torch and probes its hardware first).
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(launch_node, coord, tmp_path / f"n{i}", name=f"volunteer-{i}") for i in range(3)]
        nodes = [f.result() for f in futures if f.exception() is None]
        for node in nodes:
            stack.callback(node.proc.stop)
        for f in futures:
            if f.exception() is not None:
                raise f.exception()
        ids = [n.node_id for n in nodes]

        async def go(browser):
            page = await browser.new_page()
            await page.goto(coord.status_page)  # the printed URL; the default 3 s polling: what a user gets
            for nid in ids:
                assert await page.wait_for(_state_of(nid), timeout_s=20) == "online"
            row = await page.eval(f"[...document.querySelector('tr[data-node-id=\"{ids[0]}\"]').cells]"
                                  ".map(td => td.textContent)")
            assert row[0] == "volunteer-0" and "cpu" in row[3] and row[4].endswith("GiB")
            assert float(row[5]) > 0  # measured TFLOPS
            assert row[6].endswith(" GB/s") and float(row[6].split()[0]) > 0  # measured memory bandwidth
            # The coordinator measures the links between the nodes; the heatmap legend gets a range.
            await page.wait_for("document.querySelector('#heatmap-bandwidth .legend').textContent.includes('bit/s')",
                                timeout_s=30)
            # Hovering a measured cell shows its value and the age of the measurement.
            tip = await _hover_first_measured(page)
            assert " \u2192 " in tip and "bit/s" in tip and "measured" in tip and "ago" in tip, tip
            await page.wait_for("document.querySelectorAll('#plan-pipeline .stage').length > 0", timeout_s=20)
            await page.screenshot(ARTIFACTS / "web-e2e.png")

            await page.eval("window.__sameDocument = 7")
            nodes[1].proc.kill()  # SIGKILL: no goodbye, so the coordinator must notice the silence
            await page.wait_for(f"{_state_of(ids[1])} === 'lost'", timeout_s=20)
            assert await page.eval(_state_of(ids[0])) == "online" and await page.eval(_state_of(ids[2])) == "online"
            assert await page.eval("window.__sameDocument") == 7  # no reload happened
            assert await page.eval("document.getElementById('count-lost').textContent") == "1"
            # The heatmaps show the online nodes: the lost one leaves them by the next poll.
            await page.wait_for("document.querySelector('#heatmap-bandwidth canvas').dataset.n === '2'", timeout_s=10)
            await page.screenshot(ARTIFACTS / "web-e2e-lost.png")
            assert page.errors == [] and page.dialogs == []

        asyncio.run(with_browser(go, executable=exe))
        assert _node_counts(coord.http_url, coord.read_token) == {"online": 2, "lost": 1, "left": 0}
