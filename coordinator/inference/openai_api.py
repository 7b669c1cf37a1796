"""OpenAI-compatible HTTP API on the coordinator's HTTP port.

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``
answers with server-sent events, ending with ``data: [DONE]``). Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 400 bad request, 404 unknown model,
503 no capacity. Extensions: ``top_k`` and ``seed``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid

from aiohttp import web

from swarm.errors import CapacityError, InvalidRequestError, NotFoundError, SwarmError, UnavailableError
from swarm.inference.sampling import SamplingParams
from swarm.inference.session import TokenEvent

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16
MAX_TOKENS = 1 << 15
EVENT_TIMEOUT_S = 300.0
_UNSUPPORTED = ("logprobs", "echo", "best_of", "suffix", "tools", "functions", "logit_bias")


def _error(status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "param": param, "code": code}}, status=status)


def _error_for(exc: Exception) -> web.Response:
    if isinstance(exc, NotFoundError):
        return _error(404, str(exc), code="model_not_found")
    if isinstance(exc, InvalidRequestError):
        return _error(400, str(exc))
    if isinstance(exc, (CapacityError, UnavailableError)):
        return _error(503, str(exc), type_="server_error", code="no_capacity")
    if isinstance(exc, SwarmError):
        return _error(500, str(exc), type_="server_error")
    log.error("internal error in the OpenAI API", exc_info=exc)
    return _error(500, "internal error; see the coordinator's log", type_="server_error")


def _number(body: dict, key: str, default, *, lo: float, hi: float, integer: bool = False):
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise InvalidRequestError(f"'{key}' must be a{'n integer' if integer else ' number'}")
    if not (math.isfinite(v) and lo <= v <= hi):
        raise InvalidRequestError(f"'{key}' must be in [{lo}, {hi}], got {v}")
    return int(v) if integer else float(v)


def parse_sampling(body: dict) -> SamplingParams:
    """OpenAI request fields -> SamplingParams (raises InvalidRequestError)."""
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, False, 0, [], {}):
            raise InvalidRequestError(f"'{key}' is not supported by this server")
    n = body.get("n", 1)
    if n not in (1, None):
        raise InvalidRequestError("only n=1 is supported")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", DEFAULT_MAX_TOKENS, lo=1, hi=MAX_TOKENS, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise InvalidRequestError("'stop' must be a string or a list of strings")
    seed = body.get("seed")
    seed = 0 if seed is None else _number(body, "seed", 0, lo=0, hi=2**63 - 1, integer=True)
    return SamplingParams(
        temperature=_number(body, "temperature", 1.0, lo=0.0, hi=2.0),
        top_p=_number(body, "top_p", 1.0, lo=1e-9, hi=1.0),
        top_k=_number(body, "top_k", 0, lo=0, hi=1 << 20, integer=True),
        seed=seed,
        max_new_tokens=max_tokens,
        stop=stop,
    )


class OpenAIApi:
    def __init__(self, engine) -> None:
        self.engine = engine

    def install(self, web_app: web.Application) -> None:
        web_app.router.add_get("/v1/models", self.models)
        web_app.router.add_post("/v1/completions", self.completions)
        web_app.router.add_post("/v1/chat/completions", self.chat_completions)

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m.record.name, "object": "model", "created": int(m.record.created_at_s), "owned_by": "swarm",
             "state": m.state}
            for m in self.engine.models()
        ]
        return web.json_response({"object": "list", "data": data})

    async def _body(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise InvalidRequestError("the request body must be a JSON object") from None
        if not isinstance(body, dict):
            raise InvalidRequestError("the request body must be a JSON object")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise InvalidRequestError("'model' is required (see GET /v1/models)")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequestError("'stream' must be true or false")
        return body

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            m = self.engine.get(body["model"])
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = m.text.encode(prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                ids = list(prompt)
            else:
                raise InvalidRequestError("'prompt' must be a string or a list of token ids (one prompt per request)")
            if not ids:
                raise InvalidRequestError("'prompt' is empty")
            params = parse_sampling(body)
        except Exception as exc:  # noqa: BLE001 -- every failure becomes an OpenAI error body
            return _error_for(exc)
        return await self._run(request, body, ids, params, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            m = self.engine.get(body["model"])
            ids = m.text.encode(m.text.chat_prompt(body.get("messages")))
            params = parse_sampling(body)
        except Exception as exc:  # noqa: BLE001
            return _error_for(exc)
        return await self._run(request, body, ids, params, chat=True)

    async def _run(self, request, body, ids, params, *, chat: bool) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        try:
            session = self.engine.submit(body["model"], prompt_ids=ids, params=params,
                                         sink=lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        except Exception as exc:  # noqa: BLE001
            return _error_for(exc)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        model = body["model"]
        obj = "chat.completion" if chat else "text_completion"

        async def next_event():
            try:
                ev = await asyncio.wait_for(q.get(), timeout=EVENT_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise UnavailableError("no token for a long time; the swarm is stuck, retry later") from None
            if isinstance(ev, Exception):
                raise ev
            return ev

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        def reason(ev: TokenEvent) -> str:
            return "length" if ev.finish_reason == "length" else "stop"

        if not body.get("stream"):
            text, n = [], 0
            try:
                while True:
                    ev = await next_event()
                    text.append(ev.text)
                    n += len(ev.token_ids)
                    if ev.finish_reason:
                        break
            except asyncio.CancelledError:
                self.engine.cancel(session)
                raise
            except Exception as exc:  # noqa: BLE001
                self.engine.cancel(session)
                return _error_for(exc)
            choice = {"index": 0, "finish_reason": reason(ev), "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": "".join(text)}
            else:
                choice["text"] = "".join(text)
            return web.json_response({"id": rid, "object": obj, "created": created, "model": model,
                                      "choices": [choice], "usage": usage(n)})

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        async def send(choice: dict, **extra) -> None:
            payload = {"id": rid, "object": chunk_obj, "created": created, "model": model, "choices": [choice], **extra}
            await resp.write(f"data: {json.dumps(payload)}\n\n".encode())

        n = 0
        try:
            if chat:
                await send({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            while True:
                try:
                    ev = await next_event()
                except SwarmError as exc:
                    await resp.write(f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n".encode())
                    break
                n += len(ev.token_ids)
                fin = reason(ev) if ev.finish_reason else None
                if chat:
                    delta = {"content": ev.text} if ev.text else {}
                    await send({"index": 0, "delta": delta, "finish_reason": fin, "logprobs": None})
                else:
                    await send({"index": 0, "text": ev.text, "finish_reason": fin, "logprobs": None})
                if fin:
                    break
            await resp.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            self.engine.cancel(session)
            raise
        await resp.write_eof()
        return resp
