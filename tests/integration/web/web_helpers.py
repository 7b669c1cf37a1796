"""Helpers of the status page's tests: an in-process coordinator (real gRPC + HTTP servers, real
SQLite) driven by a fake clock, nodes put straight into its registry, jobs put into the jobs
plugin's store, and a headless Chromium on a background event loop for sync tests."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import aiohttp

from swarm.clock import FakeClock
from swarm.hardware import HardwareInfo

from coordinator.app import CoordinatorApp, CoordinatorConfig
from tests.e2e.chromium import Browser

ARTIFACTS = Path(__file__).resolve().parents[3] / "artifacts"


def hardware(*, tflops: float = 0.5, memory_bytes: int = 8 << 30) -> HardwareInfo:
    return HardwareInfo(
        device="cpu", device_kind="cpu", device_name="test cpu", memory_bytes=memory_bytes,
        memory_free_bytes=memory_bytes // 2, cpu_cores=2, ram_bytes=memory_bytes, disk_free_bytes=1 << 30,
        tflops=tflops, tflops_dtype="float32",
    )


def node_id(i: int) -> str:
    return f"{i:04d}" + "ab" * 14


class Coordinator:
    """The app, its fake clock and HTTP helpers."""

    def __init__(self, app: CoordinatorApp, clock: FakeClock) -> None:
        self.app = app
        self.clock = clock
        self.url = f"http://127.0.0.1:{app.http_port}"

    def add_node(self, i: int, *, name: str | None = None, metrics: dict | None = None, **hw) -> str:
        nid = node_id(i)
        self.app.registry.register(
            node_id=nid, name=name if name is not None else f"node-{i}", public_key=b"k" * 32,
            peer_address=f"127.0.0.1:{20000 + i}", hardware=hardware(**hw),
        )
        if metrics is not None:
            self.app.registry.heartbeat(nid, metrics=metrics)
        return nid

    def get(self, path: str, *, method: str = "GET", token: str | None = None) -> tuple[int, dict[str, str], bytes]:
        """``method path`` with ``Authorization: Bearer`` the read token (or ``token``; "" sends none)."""
        token = self.app.read_token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}

        async def go():
            async with aiohttp.ClientSession() as s, s.request(method, self.url + path, headers=headers) as r:
                return r.status, dict(r.headers), await r.read()

        return asyncio.run(go())


def start_coordinator(tmp_path: Path, plugins: tuple[str, ...], **overrides) -> Coordinator:
    """``overrides``: more CoordinatorConfig fields (``public_status=True``, ``api_keys=...``)."""
    clock = FakeClock()
    config = CoordinatorConfig(state_dir=tmp_path / "coordinator", port=0, http_port=0, plugins=plugins, **overrides)
    app = CoordinatorApp(config, clock=clock)
    app.start()
    return Coordinator(app, clock)


TINY_GPT2 = {"model_type": "gpt2", "vocab_size": 256, "n_embd": 32, "n_layer": 4, "n_head": 2, "n_positions": 128}


def start_job(c: Coordinator, *, total_steps: int = 10, name: str = "tiny") -> str:
    """A job put in the jobs plugin's store and planned by its own loop (``tick``) over the
    registered nodes; returns its id once it is running."""
    from swarm.job_spec import JobSpec

    job_id = "feed" + format(len(c.app.services.jobs.store.list()), "08x")
    c.app.services.jobs.store.create(job_id=job_id, spec=JobSpec(name=name, steps=total_steps),
                            model=dict(TINY_GPT2), num_samples=64, dataset_key="k", total_steps=total_steps)
    c.app.services.jobs.tick()
    job = c.app.services.jobs.store.get(job_id)
    assert job.state == "running", job.reason
    return job_id


def report_steps(c: Coordinator, job_id: str, steps: range) -> None:
    """Progress as every stage worker of the job would report it (loss from the last stage)."""
    job = c.app.services.jobs.store.get(job_id)
    last_stage = max(a["stage"] for a in job.assignments)
    for step in steps:
        for a in job.assignments:
            c.app.services.jobs.store.add_progress(
                job_id, attempt=job.attempt, stage=a["stage"], replica=a["replica"], step=step,
                loss=(5.0 / (1 + 0.3 * step)) if a["stage"] == last_stage else None, tokens=512,
                tokens_per_s=400.0 + 10 * step, bytes_sent=50_000, bytes_raw=200_000, step_s=0.5 + 0.01 * step,
                compute_s=0.3, wait_s=0.1, comm_s=0.1,
            )


class BrowserThread:
    """A Chromium driven from an event loop in a background thread, so sync tests can use it."""

    def __init__(self, executable: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="chromium", daemon=True)
        self._thread.start()
        self.browser: Browser = self.run(Browser.launch(executable), timeout_s=60)

    def run(self, coro, *, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        try:
            self.run(self.browser.close(), timeout_s=20)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
