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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True, slots=True, kw_only=True)
class _Generation:
    """One submitted request: the engine's session, the queue its token events arrive on, and
    what every response to it repeats (id, creation time, model, prompt size)."""

    session: Any
    events: asyncio.Queue
    rid: str
    created: int
    model: str
    num_prompt_tokens: int

    async def next_event(self) -> TokenEvent:
        """The next token event; raises what the engine reported, or UnavailableError when stuck."""
        try:
            ev = await asyncio.wait_for(self.events.get(), timeout=EVENT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise UnavailableError("no token for a long time; the swarm is stuck, retry later") from None
        if isinstance(ev, Exception):
            raise ev
        return ev

    def usage(self, n: int) -> dict:
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": n,
                "total_tokens": self.num_prompt_tokens + n}


def _finish_reason(ev: TokenEvent) -> str:
    return "length" if ev.finish_reason == "length" else "stop"


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
        gen = self._submit(body, ids, params, chat=False)
        if isinstance(gen, web.Response):
            return gen
        return await (self._stream_text(request, gen) if body.get("stream") else self._complete_text(gen))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            m = self.engine.get(body["model"])
            ids = m.text.encode(m.text.chat_prompt(body.get("messages")))
            params = parse_sampling(body)
        except Exception as exc:  # noqa: BLE001
            return _error_for(exc)
        gen = self._submit(body, ids, params, chat=True)
        if isinstance(gen, web.Response):
            return gen
        return await (self._stream_chat(request, gen) if body.get("stream") else self._complete_chat(gen))

    # -- one submitted request, then one function per response mode ---------------------------
    def _submit(self, body: dict, ids: list[int], params: SamplingParams, *, chat: bool) -> _Generation | web.Response:
        """Submit the request to the engine; an OpenAI error response when it refuses."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        try:
            session = self.engine.submit(body["model"], prompt_ids=ids, params=params,
                                         sink=lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        except Exception as exc:  # noqa: BLE001
            return _error_for(exc)
        return _Generation(session=session, events=q, rid=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
                           created=int(time.time()), model=body["model"], num_prompt_tokens=len(ids))

    async def _collect(self, gen: _Generation) -> tuple[str, int, TokenEvent] | web.Response:
        """All of a non-streaming answer: (text, number of tokens, last event), or an error response."""
        text, n = [], 0
        try:
            while True:
                ev = await gen.next_event()
                text.append(ev.text)
                n += len(ev.token_ids)
                if ev.finish_reason:
                    break
        except asyncio.CancelledError:
            self.engine.cancel(gen.session)
            raise
        except Exception as exc:  # noqa: BLE001
            self.engine.cancel(gen.session)
            return _error_for(exc)
        return "".join(text), n, ev

    def _completion_response(self, gen: _Generation, obj: str, choice: dict, n: int) -> web.Response:
        return web.json_response({"id": gen.rid, "object": obj, "created": gen.created, "model": gen.model,
                                  "choices": [choice], "usage": gen.usage(n)})

    async def _complete_text(self, gen: _Generation) -> web.Response:
        """``/v1/completions`` without ``stream``: one ``text_completion`` object."""
        done = await self._collect(gen)
        if isinstance(done, web.Response):
            return done
        text, n, last = done
        choice = {"index": 0, "finish_reason": _finish_reason(last), "logprobs": None, "text": text}
        return self._completion_response(gen, "text_completion", choice, n)

    async def _complete_chat(self, gen: _Generation) -> web.Response:
        """``/v1/chat/completions`` without ``stream``: one ``chat.completion`` object."""
        done = await self._collect(gen)
        if isinstance(done, web.Response):
            return done
        text, n, last = done
        choice = {"index": 0, "finish_reason": _finish_reason(last), "logprobs": None,
                  "message": {"role": "assistant", "content": text}}
        return self._completion_response(gen, "chat.completion", choice, n)

    async def _stream(self, request: web.Request, gen: _Generation, *, chunk_obj: str, first: dict | None,
                      choice_of: Callable[[TokenEvent, str | None], dict]) -> web.StreamResponse:
        """Server-sent events: ``first`` (if any), one chunk per token event, ``data: [DONE]``. An
        error after the stream started is sent as an ``error`` event before ``[DONE]``."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(choice: dict) -> None:
            payload = {"id": gen.rid, "object": chunk_obj, "created": gen.created, "model": gen.model,
                       "choices": [choice]}
            await resp.write(f"data: {json.dumps(payload)}\n\n".encode())

        try:
            if first is not None:
                await send(first)
            while True:
                try:
                    ev = await gen.next_event()
                except SwarmError as exc:
                    await resp.write(f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n".encode())
                    break
                fin = _finish_reason(ev) if ev.finish_reason else None
                await send(choice_of(ev, fin))
                if fin:
                    break
            await resp.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            self.engine.cancel(gen.session)
            raise
        await resp.write_eof()
        return resp

    async def _stream_text(self, request: web.Request, gen: _Generation) -> web.StreamResponse:
        """``/v1/completions`` with ``stream``: ``text_completion`` chunks."""
        return await self._stream(request, gen, chunk_obj="text_completion", first=None,
                                  choice_of=lambda ev, fin: {"index": 0, "text": ev.text, "finish_reason": fin,
                                                             "logprobs": None})

    async def _stream_chat(self, request: web.Request, gen: _Generation) -> web.StreamResponse:
        """``/v1/chat/completions`` with ``stream``: a role chunk, then ``chat.completion.chunk`` deltas."""
        return await self._stream(
            request, gen, chunk_obj="chat.completion.chunk",
            first={"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
            choice_of=lambda ev, fin: {"index": 0, "delta": {"content": ev.text} if ev.text else {},
                                       "finish_reason": fin, "logprobs": None})
