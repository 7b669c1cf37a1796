"""Drive headless Chromium over the DevTools protocol (CDP) with aiohttp's websocket client.

No Playwright/driver download: Debian's ``chromium`` (``apt-get install chromium``; CI gets it
from ``scripts/setup.sh``) plus a ~150-line client. Protocol: the browser prints
``DevTools listening on ws://...`` on stderr; we connect to that browser endpoint, create a
target (tab), attach to it with ``flatten=True`` and send page commands with its ``sessionId``.
Every command and wait has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--mute-audio",
)
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


def find_chromium() -> str | None:
    """The system Chromium, or None (tests skip with a message saying how to install it)."""
    for name in (os.environ.get("SWARM_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


class CDPError(RuntimeError):
    pass


class Browser:
    """One headless Chromium process and its browser-level CDP connection."""

    def __init__(self, proc: asyncio.subprocess.Process, profile: tempfile.TemporaryDirectory) -> None:
        self._proc = proc
        self._profile = profile
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._listeners: list[Callable[[dict], None]] = []
        self._reader: asyncio.Task | None = None
        self._stderr_task: asyncio.Task | None = None
        self.stderr_tail: list[str] = []

    @classmethod
    async def launch(cls, executable: str, *, timeout_s: float = 30.0) -> Browser:
        profile = tempfile.TemporaryDirectory(prefix="swarm-chromium-")
        proc = await asyncio.create_subprocess_exec(
            executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile.name}", "--remote-debugging-port=0",
            "about:blank", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,  # its own group: kill helpers too
        )
        browser = cls(proc, profile)
        try:
            url = await asyncio.wait_for(browser._read_endpoint(), timeout_s)
            browser._stderr_task = asyncio.create_task(browser._drain_stderr())
            browser._http = aiohttp.ClientSession()
            browser._ws = await browser._http.ws_connect(url, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5))
            browser._reader = asyncio.create_task(browser._read_loop())
        except BaseException:
            await browser.close()
            raise
        return browser

    async def _read_endpoint(self) -> str:
        assert self._proc.stderr is not None
        while True:
            line = await self._proc.stderr.readline()
            if not line:
                raise CDPError("chromium exited before opening DevTools: " + " | ".join(self.stderr_tail[-10:]))
            text = line.decode(errors="replace").rstrip()
            self.stderr_tail.append(text)
            if m := _LISTENING.search(text):
                return m.group(1)

    async def _drain_stderr(self) -> None:
        assert self._proc.stderr is not None
        while line := await self._proc.stderr.readline():
            self.stderr_tail = (self.stderr_tail + [line.decode(errors="replace").rstrip()])[-50:]

    async def _read_loop(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    if "error" in data:
                        fut.set_exception(CDPError(f"{data['error'].get('message')}: {data['error'].get('data', '')}"))
                    else:
                        fut.set_result(data.get("result", {}))
            else:
                for listener in list(self._listeners):
                    listener(data)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CDPError("the DevTools connection closed"))

    async def send(self, method: str, params: dict | None = None, *, session_id: str | None = None,
                   timeout_s: float = 15.0) -> dict[str, Any]:
        assert self._ws is not None
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id:
            msg["sessionId"] = session_id
        await self._ws.send_str(json.dumps(msg))
        try:
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._pending.pop(msg_id, None)

    async def new_page(self, *, width: int = 1400, height: int = 1000) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"])
        self._listeners.append(page._on_event)
        for method in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
            await page.send(method)
        await page.send("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        return page

    async def close(self) -> None:
        if self._ws is not None and not self._ws.closed:
            try:
                await asyncio.wait_for(self.send("Browser.close", timeout_s=5), 6)
            except Exception:  # noqa: BLE001 -- we kill it below anyway
                pass
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        if self._proc.returncode is None:
            try:
                await asyncio.wait_for(self._proc.wait(), 5)
            except asyncio.TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        try:  # renderer/zygote helpers left in the group (normally none after Browser.close)
            os.killpg(self._proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for task in (self._reader, self._stderr_task):
            if task is not None:
                task.cancel()
        self._profile.cleanup()


class Page:
    """One tab. Records dialogs (``alert`` would show up here), script errors (exceptions, console
    errors, CSP violations) and failed loads (``network_errors``)."""

    def __init__(self, browser: Browser, session_id: str) -> None:
        self._browser = browser
        self.session_id = session_id
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.network_errors: list[str] = []
        self.requests: list[str] = []  # URLs the page asked for, in order
        self._load = asyncio.Event()

    def _on_event(self, event: dict) -> None:
        if event.get("sessionId") != self.session_id:
            return
        method, params = event.get("method"), event.get("params", {})
        if method == "Page.loadEventFired":
            self._load.set()
        elif method == "Network.requestWillBeSent":
            self.requests.append(params.get("request", {}).get("url", ""))
        elif method == "Page.javascriptDialogOpening":
            self.dialogs.append(params.get("message", ""))
            asyncio.ensure_future(self.send("Page.handleJavaScriptDialog", {"accept": False}))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            # A failed fetch (say a 404 of an optional route) is not a page error; CSP violations
            # and script errors are.
            target = self.network_errors if entry.get("source") == "network" else self.errors
            target.append(f"{entry.get('text', '')} {entry.get('url', '')}".strip())
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))

    async def send(self, method: str, params: dict | None = None, **kw) -> dict[str, Any]:
        return await self._browser.send(method, params, session_id=self.session_id, **kw)

    async def goto(self, url: str, *, timeout_s: float = 20.0) -> None:
        self._load.clear()
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigating to {url} failed: {result['errorText']}")
        await asyncio.wait_for(self._load.wait(), timeout_s)

    async def eval(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate",
                                 {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} threw: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, *, timeout_s: float = 20.0, interval_s: float = 0.1) -> Any:
        """Poll ``expression`` until it is truthy; returns its value. Raises TimeoutError with the
        last value seen."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        value = None
        while loop.time() < deadline:
            value = await self.eval(expression)
            if value:
                return value
            await asyncio.sleep(interval_s)
        raise TimeoutError(f"{expression!r} stayed falsy for {timeout_s} s (last value {value!r})")

    async def screenshot(self, path: Path, *, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            metrics = await self.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics.get("contentSize")
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        data = await self.send("Page.captureScreenshot", params, timeout_s=30)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path


async def with_browser(fn: Callable[[Browser], Awaitable[Any]], *, executable: str | None = None) -> Any:
    """Launch Chromium, run ``fn(browser)``, always close it."""
    exe = executable or find_chromium()
    if exe is None:
        raise CDPError("no chromium found; apt-get install chromium (scripts/setup.sh does it as root)")
    browser = await Browser.launch(exe)
    try:
        return await fn(browser)
    finally:
        await browser.close()
