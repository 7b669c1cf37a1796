"""The coordinator's HTTP server (aiohttp, in its own thread and event loop).

Routes of its own: ``GET /api/nodes`` and ``GET /api/network``. Plugins add routes through
their ``install_http(web_app)`` hook (see :mod:`coordinator.plugins`) before the server starts (aiohttp freezes the router then).
Handlers run on this server's loop: keep them non-blocking, or use ``loop.run_in_executor``.

Every request with a body goes through :func:`body_limits` first: a body over
:data:`MAX_REQUEST_BYTES` is answered 413 and a JSON body nested deeper than
:data:`MAX_JSON_DEPTH` 400, before any handler sees them. Handlers parse JSON with
:func:`loads_json` (or ``request.json(loads=loads_json)``), which raises
:class:`~swarm.errors.InvalidRequestError` for anything that is not bounded, valid UTF-8 JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import threading

from aiohttp import web

from swarm.errors import InvalidRequestError
from swarm.membership import link_json, node_json

log = logging.getLogger(__name__)

APP_KEY = web.AppKey("coordinator_app", object)
MAX_REQUEST_BYTES = 16 << 20
MAX_JSON_DEPTH = 64  # OpenAI chat bodies nest ~5 deep; deeper is an attack on recursive code


class JsonTooDeepError(InvalidRequestError):
    """A JSON document nested deeper than allowed."""


def _depth(obj, max_depth: int) -> int:
    """Nesting depth of a parsed JSON value, counted without recursion; stops past ``max_depth``."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > max_depth:
                return deepest
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def loads_json(data: bytes | str, *, max_depth: int = MAX_JSON_DEPTH):
    """Parse a JSON request body. Raises InvalidRequestError (JsonTooDeepError when nested
    deeper than ``max_depth``) for bad UTF-8 or bad JSON; never RecursionError."""
    try:
        value = json.loads(data)  # the C scanner is linear and raises RecursionError, never crashes
    except RecursionError:
        raise JsonTooDeepError(f"the JSON body nests deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidRequestError(f"the request body is not valid UTF-8 JSON ({exc})") from None
    if _depth(value, max_depth) > max_depth:
        raise JsonTooDeepError(f"the JSON body nests deeper than {max_depth} levels")
    return value


def _is_json(request: web.Request) -> bool:
    return request.content_type == "application/json" or request.path.startswith("/v1/")


def _error_body(status: int, message: str) -> web.Response:
    # OpenAI's error shape, also fine for our own /api routes.
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                        "code": None}}, status=status)


@web.middleware
async def body_limits(request: web.Request, handler):
    """Refuse oversized bodies (413) and too deeply nested JSON (400) before the handler runs."""
    if request.body_exists:
        try:
            body = await request.read()  # cached: the handler's request.json()/read() reuses it
        except web.HTTPRequestEntityTooLarge:
            return _error_body(413, f"the request body is larger than {MAX_REQUEST_BYTES} bytes")
        if body and _is_json(request):
            try:
                loads_json(body)
            except JsonTooDeepError as exc:
                return _error_body(400, str(exc))
            except InvalidRequestError:
                pass  # not JSON at all: the handler answers in its own words
    return await handler(request)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


async def api_nodes(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    now = app.clock.time()
    return web.json_response({"nodes": [node_json(n, now) for n in app.registry.snapshot()], "server_time": now})


async def api_network(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    nodes = [n for n in app.registry.snapshot() if n.state == "online"]
    ids = [n.id for n in nodes]
    delay, bandwidth, measured = app.network.matrix(ids)
    return web.json_response({
        "node_ids": ids,
        "names": [n.name for n in nodes],
        "delay_s": [[_finite(v) for v in row] for row in delay],
        "bandwidth_Bps": [[_finite(v) for v in row] for row in bandwidth],
        "measured_at": [[_finite(v) for v in row] for row in measured],
        "links": [link_json(link) for link in app.network.links()],
        "server_time": app.clock.time(),
    })


def build_web_app(app) -> web.Application:
    web_app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[body_limits])
    web_app[APP_KEY] = app
    web_app.router.add_get("/api/nodes", api_nodes)
    web_app.router.add_get("/api/network", api_network)
    return web_app


class HttpServer:
    """Runs an aiohttp Application on ``host:port`` in a daemon thread."""

    def __init__(self, web_app: web.Application, host: str, port: int, *, ssl_context=None) -> None:
        self.web_app = web_app
        self._ssl_context = ssl_context  # HTTPS when set (--tls-cert/--tls-key), plain HTTP otherwise
        self._host = host
        self._port = port
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="http", daemon=True)

    def start(self) -> int:
        """Start serving; returns the bound port."""
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self.loop)
        self.port = fut.result(timeout=30)
        return self.port

    async def _start(self) -> int:
        # Bind the socket ourselves so port 0 works and the bound port is known (public API only).
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._runner = web.AppRunner(self.web_app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=self._ssl_context).start()
        return sock.getsockname()[1]

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self._runner is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(timeout=10)
            except Exception:  # noqa: BLE001 -- shutting down anyway
                log.exception("error while stopping the HTTP server")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
