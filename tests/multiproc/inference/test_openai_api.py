"""The OpenAI-compatible HTTP API, driven by the official `openai` client, streaming and not."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from tokenizers import Tokenizer

from swarm.inference.sampling import SamplingParams
from swarm.model.testing import make_tiny_checkpoint
from tests.helpers.procs import child_env, node_proc, wait_until
from tests.multiproc.inference.test_pipeline_generation import coordinator, reference

pytestmark = pytest.mark.multiproc


def post(url: str, body: bytes, token: str = "") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json",
                                                          "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.timeout(100)
def test_openai_client_completions_and_chat(tmp_path):
    openai = pytest.importorskip("openai")
    d = tmp_path / "ckpt"
    cfg = make_tiny_checkpoint(d, "llama", num_layers=2, hidden_size=64, num_heads=4, seed=3)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    prompt = "Once upon a time"
    want_ids = reference(d, tok.encode(prompt).ids, SamplingParams(max_new_tokens=12), cfg.eos_token_id)
    want_text = tok.decode(want_ids, skip_special_tokens=True)
    with coordinator(tmp_path) as coord, node_proc(coord, tmp_path / "n0"), node_proc(coord, tmp_path / "n1"):
        wait_until(lambda: len([n for n in coord.snapshot().nodes if n.state == "online"]) == 2, timeout_s=30)
        # the CLI end to end: serve (upload + placement), models --json, generate --json
        cli = [sys.executable, "-m", "swarm.cli"]
        out = subprocess.run(cli + ["serve", "--coordinator", coord.address, "--model", str(d), "--name", "tiny-llama",
                                    "--stages", "2", "--max-seq-len", "128", "--json",
                                    "--token", coord.admin_token],
                             capture_output=True, text=True, timeout=60, env=child_env())
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)["replicas"][0]["stages"]) == 2
        out = subprocess.run(cli + ["models", "--coordinator", coord.address, "--token", coord.read_token, "--json"], capture_output=True, text=True,
                             timeout=30, env=child_env())
        assert [m["name"] for m in json.loads(out.stdout)["models"]] == ["tiny-llama"]
        out = subprocess.run(cli + ["generate", "--coordinator", coord.address, "--token", coord.read_token, "--model", "tiny-llama", "--prompt", prompt,
                                    "--max-new-tokens", "12", "--json"], capture_output=True, text=True, timeout=60,
                             env=child_env())
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout)
        assert res["token_ids"] == want_ids and res["text"] == want_text and res["model"] == "tiny-llama"
        assert res["time_to_first_token_s"] > 0 and res["tokens_per_s"] > 0
        out = subprocess.run(cli + ["generate", "--coordinator", coord.address, "--token", coord.read_token, "--model", "nope", "--prompt", "x"],
                             capture_output=True, text=True, timeout=60, env=child_env())
        assert out.returncode == 1 and "not served" in out.stderr
        client = openai.OpenAI(base_url=coord.http_url + "/v1", api_key=coord.read_token, max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["tiny-llama"]

        out = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == want_text
        assert out.usage.completion_tokens == len(want_ids)
        assert out.choices[0].finish_reason in ("length", "stop")

        pieces = [c.choices[0].text for c in client.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0, stream=True)]
        assert "".join(pieces) == want_text and len(pieces) >= 2

        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the swarm."}]
        chat = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=10, temperature=0)
        assert chat.choices[0].message.role == "assistant"
        streamed = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=10, temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == chat.choices[0].message.content

        sampled = [client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=1.0,
                                             top_p=0.9, seed=42).choices[0].text for _ in range(2)]
        assert sampled[0] == sampled[1]  # seeded

        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="missing", prompt=prompt, max_tokens=4)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=4, temperature=7)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=100000)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny-llama", messages=[{"role": "wizard", "content": "x"}], max_tokens=4)
        status, body = post(coord.http_url + "/v1/completions", b"{not json", coord.read_token)
        assert status == 400 and "JSON" in body["error"]["message"]
        status, body = post(coord.http_url + "/v1/completions", json.dumps({"model": "tiny-llama", "prompt": 5}).encode(), coord.read_token)
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
        # still serving after the bad requests
        assert client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0).choices[0].text == want_text
