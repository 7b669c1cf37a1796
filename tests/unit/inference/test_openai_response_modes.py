"""The OpenAI API's four response modes, byte for byte, against a scripted engine (no swarm)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from coordinator.inference import openai_api
from swarm.errors import UnavailableError
from swarm.inference.session import TokenEvent


class _Text:
    def encode(self, s: str) -> list[int]:
        return [ord(c) for c in s]

    def chat_prompt(self, messages) -> str:
        return "".join(m["content"] for m in messages)


class _Model:
    text = _Text()


class ScriptedEngine:
    """Answers every request with the same events (a failure after the first one if ``fail``)."""

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.cancelled: list[str] = []

    def get(self, name: str) -> _Model:
        return _Model()

    def submit(self, model, *, prompt_ids, params, sink) -> str:
        def run() -> None:
            sink(TokenEvent(token_ids=[1], text="a", finish_reason=None))
            if self.fail:
                sink(UnavailableError("node lost"))
                return
            sink(TokenEvent(token_ids=[2], text="", finish_reason=None))
            sink(TokenEvent(token_ids=[3, 4], text="bc", finish_reason="length"))

        threading.Thread(target=run, daemon=True).start()
        return "session"

    def cancel(self, session: str) -> None:
        self.cancelled.append(session)


def _post(path: str, body: dict, engine: ScriptedEngine, monkeypatch) -> tuple[int, str, bytes]:
    monkeypatch.setattr(openai_api.uuid, "uuid4", lambda: openai_api.uuid.UUID(int=7))
    monkeypatch.setattr(openai_api.time, "time", lambda: 1234.5)

    async def go():
        app = web.Application()
        openai_api.OpenAIApi(engine).install(app)
        async with TestClient(TestServer(app)) as client:
            r = await client.post(path, json=body)
            return r.status, r.headers["Content-Type"].split(";")[0], await r.read()

    return asyncio.run(go())


RID = "000000000000000000000000"
HEAD = '"created": 1234, "model": "m", '


def _sse(*payloads: str) -> bytes:
    return "".join(f"data: {p}\n\n" for p in payloads).encode()


@pytest.mark.timeout(30)
def test_non_streaming_completion(monkeypatch) -> None:
    status, ctype, body = _post("/v1/completions", {"model": "m", "prompt": "hi"}, ScriptedEngine(), monkeypatch)
    assert (status, ctype) == (200, "application/json")
    assert json.loads(body) == {
        "id": f"cmpl-{RID}", "object": "text_completion", "created": 1234, "model": "m",
        "choices": [{"index": 0, "finish_reason": "length", "logprobs": None, "text": "abc"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6},
    }


@pytest.mark.timeout(30)
def test_non_streaming_chat(monkeypatch) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hey"}]}
    status, _, out = _post("/v1/chat/completions", body, ScriptedEngine(), monkeypatch)
    assert status == 200
    assert json.loads(out) == {
        "id": f"chatcmpl-{RID}", "object": "chat.completion", "created": 1234, "model": "m",
        "choices": [{"index": 0, "finish_reason": "length", "logprobs": None,
                     "message": {"role": "assistant", "content": "abc"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }


@pytest.mark.timeout(30)
def test_streaming_completion_bytes(monkeypatch) -> None:
    status, ctype, out = _post("/v1/completions", {"model": "m", "prompt": "hi", "stream": True}, ScriptedEngine(),
                               monkeypatch)
    assert (status, ctype) == (200, "text/event-stream")
    chunk = '{"id": "cmpl-' + RID + '", "object": "text_completion", ' + HEAD + '"choices": [{"index": 0, "text": '
    assert out == _sse(chunk + '"a", "finish_reason": null, "logprobs": null}]}',
                       chunk + '"", "finish_reason": null, "logprobs": null}]}',
                       chunk + '"bc", "finish_reason": "length", "logprobs": null}]}', "[DONE]")


@pytest.mark.timeout(30)
def test_streaming_chat_bytes(monkeypatch) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hey"}], "stream": True}
    status, ctype, out = _post("/v1/chat/completions", body, ScriptedEngine(), monkeypatch)
    assert (status, ctype) == (200, "text/event-stream")
    chunk = '{"id": "chatcmpl-' + RID + '", "object": "chat.completion.chunk", ' + HEAD + '"choices": [{"index": 0, '
    assert out == _sse(chunk + '"delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}',
                       chunk + '"delta": {"content": "a"}, "finish_reason": null, "logprobs": null}]}',
                       chunk + '"delta": {}, "finish_reason": null, "logprobs": null}]}',
                       chunk + '"delta": {"content": "bc"}, "finish_reason": "length", "logprobs": null}]}',
                       "[DONE]")


@pytest.mark.timeout(30)
def test_failure_mid_stream_is_an_error_event_then_done(monkeypatch) -> None:
    status, _, out = _post("/v1/completions", {"model": "m", "prompt": "hi", "stream": True},
                           ScriptedEngine(fail=True), monkeypatch)
    assert status == 200
    assert out.endswith(_sse('{"error": {"message": "node lost", "type": "server_error"}}', "[DONE]"))


@pytest.mark.timeout(30)
def test_failure_without_stream_is_a_503_and_cancels(monkeypatch) -> None:
    engine = ScriptedEngine(fail=True)
    status, _, out = _post("/v1/completions", {"model": "m", "prompt": "hi"}, engine, monkeypatch)
    assert status == 503 and json.loads(out)["error"]["code"] == "no_capacity"
    assert engine.cancelled == ["session"]
