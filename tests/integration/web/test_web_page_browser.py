"""The page in headless Chromium against an in-process coordinator: empty swarm, hostile
names, live state changes without reload, 200 nodes, and a running job's panel. Screenshots
go to artifacts/ (gitignored)."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import quote

import pytest

from tests.integration.web.web_helpers import ARTIFACTS, report_steps, start_job

HOSTILE = ["<script>alert(1)</script>", '<img src=x onerror="alert(2)">', "</td><b>bold</b>", "constructor"]


def _row_state(nid: str) -> str:
    return f"(document.querySelector('tr[data-node-id=\"{nid}\"] td.state') || {{}}).textContent"


async def _open(browser, coordinator):
    """The page as a user opens it: once with the read token in the URL (it becomes a cookie)."""
    page = await browser.new_page()
    await page.goto(f"{coordinator.url}/?token={quote(coordinator.app.read_token)}&poll_ms=500")
    await page.wait_for("Number(document.body.getAttribute('data-polls')) >= 1")
    return page


def test_empty_swarm(browser, coordinator) -> None:
    async def go():
        page = await _open(browser.browser, coordinator)
        visible = await page.eval("""[...['nodes-empty', 'plan-empty', 'jobs-empty']].map(
            id => !document.getElementById(id).hidden)""")
        assert visible == [True, True, True]
        assert await page.eval("document.getElementById('count-online').textContent") == "0"
        assert await page.eval("document.getElementById('status').getAttribute('data-ok')") == "true"
        await page.screenshot(ARTIFACTS / "web-empty.png")
        assert page.errors == [] and page.dialogs == []

    browser.run(go())


def test_hostile_names_show_as_text(browser, coordinator) -> None:
    ids = [coordinator.add_node(i, name=name) for i, name in enumerate(HOSTILE)]

    async def go():
        page = await _open(browser.browser, coordinator)
        await page.wait_for(f"document.querySelectorAll('#nodes-body tr').length === {len(ids)}")
        names = await page.eval(
            "Object.fromEntries([...document.querySelectorAll('#nodes-body tr')].map("
            "tr => [tr.getAttribute('data-node-id'), tr.querySelector('td.name').textContent]))")
        assert names == dict(zip(ids, HOSTILE))
        # The plan preview lists the same names inside its stage boxes: as text too.
        await page.wait_for("document.querySelectorAll('#plan-pipeline li').length > 0")
        plan_names = await page.eval("[...document.querySelectorAll('#plan-pipeline li')].map(li => li.textContent)")
        assert set(plan_names) <= set(HOSTILE)
        injected = await page.eval("""({scripts: document.scripts.length, imgs: document.images.length,
            bold: document.querySelectorAll('main b').length})""")
        assert injected == {"scripts": 3, "imgs": 0, "bold": 0}  # only our own three scripts
        await page.screenshot(ARTIFACTS / "web-hostile-names.png")
        assert page.dialogs == [] and page.errors == []

    browser.run(go())


def test_states_update_live_without_reload(browser, coordinator) -> None:
    ids = [coordinator.add_node(i, metrics={"bytes_sent": 10 << 20, "bytes_received": 3 << 20}) for i in range(3)]

    async def go():
        page = await _open(browser.browser, coordinator)
        for nid in ids:
            assert await page.wait_for(_row_state(nid)) == "online"
        await page.eval("window.__sameDocument = 42")
        coordinator.clock.advance(coordinator.app.config.node_timeout_s + 1)
        coordinator.app.registry.heartbeat(ids[0])
        coordinator.app.registry.leave(ids[2])
        await page.wait_for(f"{_row_state(ids[1])} === 'lost' && {_row_state(ids[2])} === 'left'")
        assert await page.eval(_row_state(ids[0])) == "online"
        counts = await page.eval("['online', 'lost', 'left'].map(s => document.getElementById('count-' + s).textContent)")
        assert counts == ["1", "1", "1"]
        assert await page.eval("window.__sameDocument") == 42  # updated in place, never reloaded
        assert page.errors == []

    browser.run(go())


@pytest.mark.timeout(120)
def test_two_hundred_nodes(browser, coordinator) -> None:
    ids = [coordinator.add_node(i, metrics={"bytes_sent": i << 20}) for i in range(200)]
    coordinator.clock.advance(coordinator.app.config.node_timeout_s + 1)
    for nid in ids[:150]:
        coordinator.app.registry.heartbeat(nid)

    async def go():
        page = await _open(browser.browser, coordinator)
        await page.wait_for("document.querySelectorAll('#nodes-body tr').length === 200")
        counts = await page.eval("['online', 'lost'].map(s => document.getElementById('count-' + s).textContent)")
        assert counts == ["150", "50"]
        size = await page.eval("document.querySelector('#heatmap-bandwidth canvas').style.width")
        assert size == "300px"  # 150 online nodes x 2 px
        await page.wait_for("document.querySelectorAll('#plan-pipeline .stage').length > 0")
        await page.screenshot(ARTIFACTS / "web-200-nodes.png")
        assert page.errors == []

    browser.run(go())


def test_running_job_panel(browser, coordinator_with_jobs) -> None:
    c = coordinator_with_jobs
    ids = [c.add_node(i, name=f"gpu-{i}") for i in range(2)]
    job_id = start_job(c, total_steps=10, name="tiny-gpt2")
    report_steps(c, job_id, range(6))

    async def go():
        page = await _open(browser.browser, c)
        row = f"document.querySelector('tr[data-job-id=\"{job_id}\"]')"
        await page.wait_for("!!" + row)
        cells = await page.eval(f"[...{row}.cells].map(td => td.textContent)")
        assert cells[1] == "running" and "step 6 / 10" in cells[2]
        assert await page.eval(f"{row}.querySelector('a').getAttribute('href')") == f"api/jobs/{job_id}"
        await page.wait_for("!document.getElementById('job-detail').hidden")
        # loss and tokens/s charts drew a line each
        assert await page.eval("document.querySelectorAll('#chart-loss path, #chart-tps path').length") == 2
        assert "of running job" in await page.eval("document.getElementById('plan-source').textContent")
        stages = await page.eval("[...document.querySelectorAll('#nodes-body td.stage-cell')].map(td => td.textContent)")
        assert all(s.startswith("stage ") for s in stages), stages
        # Nodes do not report their own byte counters here: the Sent column shows what each sent
        # for the running job (6 steps x 50 kB).
        sent = await page.eval("[...document.querySelectorAll('#nodes-body td.sent')].map(td => td.textContent)")
        assert sent == ["293 KiB", "293 KiB"], sent
        detail = await page.eval(f"fetch('api/jobs/{job_id}').then(r => r.json())")
        assert detail["id"] == job_id and len(detail["progress"]) == 6
        await page.screenshot(ARTIFACTS / "web-job.png")
        assert page.errors == []

    browser.run(go())
    assert json.loads(c.get("/api/plan")[2])["job_id"] == job_id and ids


def test_stage_column_reads_what_nodes_report(browser, coordinator) -> None:
    inference = coordinator.add_node(0, metrics={"inference_stages": [
        {"model": "gpt2", "replica": 0, "stage": 1, "layers": [6, 12], "sessions": 2}]})
    training = coordinator.add_node(1, metrics={"training": {"job_id": "abcdef123456", "stage": 2, "replica": 1,
                                                             "step": 7, "bytes_sent": 5}})
    idle = coordinator.add_node(2, metrics={})

    async def go():
        page = await _open(browser.browser, coordinator)
        cell = "document.querySelector('tr[data-node-id=\"{}\"] td.stage-cell').textContent"
        assert await page.wait_for(cell.format(inference)) == "serve gpt2 r0 s1 layers 6\u201311"
        assert await page.eval(cell.format(training)) == "job abcdef12\u2026 stage 2 replica 1"
        assert await page.eval(cell.format(idle)) == "\u2013"
        assert page.errors == []

    browser.run(go())


def test_big_network_matrix_is_not_refetched_every_poll(browser, coordinator) -> None:
    ids = [coordinator.add_node(i) for i in range(40)]  # > 32 nodes, no links measured

    async def go():
        page = await _open(browser.browser, coordinator)  # polls every 0.5 s
        await page.wait_for("Number(document.body.getAttribute('data-polls')) >= 6", timeout_s=30)
        network = [u for u in page.requests if u.endswith("/api/network")]
        nodes = [u for u in page.requests if u.endswith("/api/nodes")]
        assert len(nodes) >= 6 and len(network) == 1, (len(nodes), len(network))
        coordinator.app.registry.leave(ids[0])  # the online set changes: refetch at once
        await page.wait_for(f"{_row_state(ids[0])} === 'left'")
        polls = int(await page.eval("document.body.getAttribute('data-polls')"))
        await page.wait_for(f"Number(document.body.getAttribute('data-polls')) >= {polls + 2}", timeout_s=30)
        assert len([u for u in page.requests if u.endswith("/api/network")]) >= 2
        assert page.errors == []

    browser.run(go())


def test_unreachable_coordinator_keeps_the_last_view_and_says_so(browser, coordinator) -> None:
    nid = coordinator.add_node(0)

    async def go():
        page = await _open(browser.browser, coordinator)
        assert await page.wait_for(_row_state(nid)) == "online"
        await asyncio.get_running_loop().run_in_executor(None, coordinator.app.http.stop)
        await page.wait_for("document.getElementById('status').getAttribute('data-ok') === 'false'")
        assert "problem" in await page.eval("document.getElementById('status').textContent")
        assert await page.eval(_row_state(nid)) == "online"  # the last answer stays on screen
        assert page.errors == []

    browser.run(go())


def test_finished_jobs_leave_no_stage_and_counts_are_plural(browser, coordinator_with_jobs) -> None:
    """Only a running job's assignments make a Stage: a failed job's worker, still the last thing
    an idle node reported, shows as no stage. "1 job", not "1 jobs"."""
    c = coordinator_with_jobs
    ids = [c.add_node(i, name=f"gpu-{i}") for i in range(2)]
    job_id = start_job(c, total_steps=3, name="short")
    report_steps(c, job_id, range(3))
    c.app.services.jobs.store.transition(job_id, "failed", reason="a stage crashed")
    # the idle node still reports the failed job's worker in its heartbeat metrics
    c.app.registry.heartbeat(ids[0], metrics={"training": {"job_id": job_id, "stage": 0, "replica": 0, "step": 2}})

    async def go():
        page = await _open(browser.browser, c)
        row = f"document.querySelector('tr[data-job-id=\"{job_id}\"]')"
        await page.wait_for("!!" + row)
        assert await page.eval("document.getElementById('count-jobs').textContent") == "1 job"
        assert await page.eval("document.getElementById('jobs-count').textContent") == "1 job"
        cell = "document.querySelector('tr[data-node-id=\"{}\"] td.stage-cell').textContent"
        assert [await page.eval(cell.format(n)) for n in ids] == ["\u2013", "\u2013"]
        # a 3-step job's charts have integer step ticks only
        await page.wait_for("document.querySelectorAll('#chart-loss path').length === 1")
        ticks = await page.eval("[...document.querySelectorAll('#chart-loss svg > g text')].map(t => t.textContent)")
        xs = ticks[-4:]  # after the y labels: the x labels, one per tick
        assert xs and all(t.lstrip("-").isdigit() for t in xs), ticks
        assert page.errors == []

    browser.run(go())


def test_heatmap_box_fits_a_small_swarm(browser, coordinator) -> None:
    """Three nodes with short names: the heatmap figure is about as wide as its canvas (label
    margin sized to the names), not a mostly empty fixed-size box."""
    for i in range(3):
        coordinator.add_node(i, name=f"n{i}")

    async def go():
        page = await _open(browser.browser, coordinator)
        await page.wait_for("Number(document.querySelector('#heatmap-bandwidth canvas').getAttribute('data-n')) === 3")
        margin = await page.eval("Number(document.querySelector('#heatmap-bandwidth canvas').getAttribute('data-margin'))")
        cell = await page.eval("Number(document.querySelector('#heatmap-bandwidth canvas').getAttribute('data-cell'))")
        assert 0 < margin <= 40, margin  # "n0".."n2": a short label column, not a fixed 96 px
        canvas_w = await page.eval("document.querySelector('#heatmap-bandwidth canvas').getBoundingClientRect().width")
        assert abs(canvas_w - (margin + 3 * cell)) <= 3  # canvas is its content
        fig_w = await page.eval("document.getElementById('heatmap-bandwidth').getBoundingClientRect().width")
        legend_w = await page.eval("document.querySelector('#heatmap-bandwidth .legend').scrollWidth")
        assert fig_w <= max(canvas_w, legend_w) + 4, (fig_w, canvas_w, legend_w)
        assert page.errors == []

    browser.run(go())


def test_token_in_the_url_becomes_a_cookie_the_page_cannot_read(browser, coordinator) -> None:
    """The printed address (/?token=READ) leaves no token in the address bar or in reach of
    scripts, and the page's API calls go through on the cookie."""
    nid = coordinator.add_node(0)

    async def go():
        page = await _open(browser.browser, coordinator)
        assert await page.eval("location.href") == coordinator.url + "/?poll_ms=500"
        assert await page.eval("document.cookie") == ""  # HttpOnly
        assert await page.wait_for(_row_state(nid)) == "online"
        assert await page.eval("document.getElementById('status').getAttribute('data-ok')") == "true"
        assert page.errors == []

    browser.run(go())
