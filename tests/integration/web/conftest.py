"""An in-process coordinator (real gRPC + HTTP servers, real SQLite) with the web plugin, a fake
clock to drive liveness, and nodes put straight into its registry; plus one headless Chromium
per module, run on a background event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from swarm.clock import FakeClock
from swarm.hardware import HardwareInfo

from coordinator.app import CoordinatorApp, CoordinatorConfig
from tests.e2e.chromium import Browser, find_chromium

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

    def get(self, path: str, *, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        async def go():
            async with aiohttp.ClientSession() as s, s.request(method, self.url + path) as r:
                return r.status, dict(r.headers), await r.read()

        return asyncio.run(go())


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    clock = FakeClock()
    config = CoordinatorConfig(state_dir=tmp_path / "coordinator", port=0, http_port=0,
                               plugins=("coordinator.web",))
    app = CoordinatorApp(config, clock=clock)
    app.start()
    try:
        yield Coordinator(app, clock)
    finally:
        app.stop(grace_s=0.1)


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


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserThread]:
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium: apt-get install chromium (scripts/setup.sh installs it when run as root)")
    bt = BrowserThread(exe)
    try:
        yield bt
    finally:
        bt.close()
