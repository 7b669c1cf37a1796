"""The coordinator's HTTP server (aiohttp, in its own thread and event loop).

Routes of its own: ``GET /api/nodes`` and ``GET /api/network``. Plugins add routes through
their ``install_http(web_app)`` hook (see :mod:`coordinator.plugins`) before the server starts (aiohttp freezes the router then).
Handlers run on this server's loop: keep them non-blocking, or use ``loop.run_in_executor``.

Every request goes through :func:`check_credentials` first (the table :func:`route_policy`):

- ``/static/*`` (the page's own JS/CSS, public code) needs nothing;
- ``/v1/*`` needs ``Authorization: Bearer KEY``: an API key when any are configured, else the
  read or admin token (401/403 in OpenAI's error shape otherwise);
- everything else (``/``, ``/api/*``, ``/metrics``) needs the read or admin token, as
  ``Authorization: Bearer TOKEN`` (what Prometheus scrapers send) or the ``swarm_token`` cookie,
  unless the coordinator runs with ``--public-status`` (then :func:`access_of` is PUBLIC and
  handlers leave out peer addresses and job assignments). A browser opens ``/?token=TOKEN``
  once: the answer sets the cookie (HttpOnly, SameSite=Strict) and redirects to ``/``, so the
  token leaves the address bar and the page's own API calls carry the cookie.

Then every request with a body goes through :func:`body_limits`: a body over
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

from swarm.errors import AuthError, InvalidRequestError, PermissionDeniedError
from swarm.membership import link_json, link_paths, node_json

from coordinator.credentials import Access, api_access, read_access

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


def _error_body(status: int, message: str, *, code: str | None = None, headers=None) -> web.Response:
    # OpenAI's error shape, also fine for our own /api routes.
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                        "code": code}}, status=status, headers=headers)


# ----------------------------------------------------------------------------- credentials
ACCESS_KEY = web.RequestKey("swarm_access", Access)
COOKIE_NAME = "swarm_token"
COOKIE_MAX_AGE_S = 30 * 86400  # a rotation ends it sooner: the cookie holds the token itself
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="swarm"'}
_LOGIN_PAGE = """<!doctype html><meta charset="utf-8"><title>swarm: token needed</title>
<p>{message}</p>
<p>Open the address <code>swarm-coordinator serve</code> printed (<code>status page: http://HOST:PORT/?token=...</code>),
or add <code>?token=READ_TOKEN</code> to this page's address once (the read token is in the coordinator's state
dir file <code>read_token</code>).</p>
"""


def route_policy(path: str) -> str:
    """``public``, ``api`` (/v1: API keys or tokens) or ``read`` (everything else: unknown paths too)."""
    if path.startswith("/static/"):
        return "public"
    if path == "/v1" or path.startswith("/v1/"):
        return "api"
    return "read"


def bearer(request: web.Request) -> str:
    """The credential of ``Authorization: Bearer X`` ('' without one)."""
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def access_of(request: web.Request) -> Access:
    """What the caller of a checked route may see (PUBLIC when unknown: leave things out)."""
    return request.get(ACCESS_KEY, Access.PUBLIC)


def _refused(request: web.Request, exc: AuthError) -> web.Response:
    status = 403 if isinstance(exc, PermissionDeniedError) else 401
    if request.path == "/" and "text/html" in request.headers.get("Accept", "text/html"):
        import html

        return web.Response(status=status, text=_LOGIN_PAGE.format(message=html.escape(str(exc))),
                            content_type="text/html", headers={**_CHALLENGE, "Cache-Control": "no-store"})
    return _error_body(status, str(exc), code="invalid_api_key" if request.path.startswith("/v1") else "unauthorized",
                       headers=_CHALLENGE)


def _login(request: web.Request, app) -> web.Response:
    """``/?token=T``: T (read or admin) goes into an HttpOnly cookie; redirect to ``/`` (other query
    parameters kept)."""
    given = request.query.get("token", "")
    kind = app.token_kind(given)
    if kind not in ("read", "admin"):
        try:
            read_access(kind, True, public_status=False, channel="http")
        except AuthError as exc:
            return _refused(request, exc)
    from urllib.parse import urlencode

    rest = urlencode([(k, v) for k, v in request.query.items() if k != "token"])
    response = web.Response(status=303, headers={"Location": "/" + (f"?{rest}" if rest else ""),
                                                 "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
    response.set_cookie(COOKIE_NAME, given, max_age=COOKIE_MAX_AGE_S, path="/", httponly=True, samesite="Strict",
                        secure=request.secure or None)
    return response


@web.middleware
async def check_credentials(request: web.Request, handler):
    """Refuse a request without the credential its route needs (see the module docstring)."""
    policy = route_policy(request.path)
    if policy == "public":
        return await handler(request)
    app = request.app[APP_KEY]
    given = bearer(request)
    if policy == "api":
        try:
            api_access(given, app.credentials)
        except AuthError as exc:
            return _refused(request, exc)
        request[ACCESS_KEY] = Access.FULL
        return await handler(request)
    if request.path == "/" and "token" in request.query:
        return _login(request, app)
    stale_cookie = False
    if not given:
        cookie = request.cookies.get(COOKIE_NAME, "")
        if cookie and app.token_kind(cookie) in ("read", "admin"):
            given = cookie
        else:
            stale_cookie = bool(cookie)  # rotated since: as if absent, and cleared
    try:
        access = read_access(app.token_kind(given) if given else None, bool(given),
                             public_status=app.config.public_status, channel="http")
    except AuthError as exc:
        response = _refused(request, exc)
    else:
        request[ACCESS_KEY] = access
        response = await handler(request)
    if stale_cookie:
        response.del_cookie(COOKIE_NAME, path="/")
    return response


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
    nodes = [node_json(n, now) for n in app.registry.snapshot()]
    if access_of(request) is not Access.FULL:
        for node in nodes:
            node.pop("peer_address", None)  # never public: where a stranger could reach a volunteer's machine
            node.pop("observed_address", None)
    return web.json_response({"nodes": nodes, "server_time": now})


async def api_network(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    everyone = app.registry.snapshot()
    path = link_paths(everyone)
    nodes = [n for n in everyone if n.state == "online"]
    ids = [n.id for n in nodes]
    delay, bandwidth, measured = app.network.matrix(ids)
    return web.json_response({
        "node_ids": ids,
        "names": [n.name for n in nodes],
        "delay_s": [[_finite(v) for v in row] for row in delay],
        "bandwidth_Bps": [[_finite(v) for v in row] for row in bandwidth],
        "measured_at": [[_finite(v) for v in row] for row in measured],
        "links": [link_json(link, path) for link in app.network.links()],
        "server_time": app.clock.time(),
    })


async def api_relay(request: web.Request) -> web.Response:
    """The coordinator's relay port: who listens on it and the bytes relayed per node
    (coordinator/reachability.py); node ids only, no addresses."""
    return web.json_response(request.app[APP_KEY].reachability.usage())


def build_web_app(app) -> web.Application:
    web_app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[check_credentials, body_limits])
    web_app[APP_KEY] = app
    web_app.router.add_get("/api/nodes", api_nodes)
    web_app.router.add_get("/api/network", api_network)
    web_app.router.add_get("/api/relay", api_relay)
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
