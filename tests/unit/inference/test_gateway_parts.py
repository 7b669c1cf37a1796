"""Coordinator-side pieces without servers: upload checks, placement shape, OpenAI field parsing."""

from __future__ import annotations

import hashlib

import pytest

from coordinator.inference.engine import model_shape
from coordinator.inference.openai_api import parse_sampling
from coordinator.inference.store import ModelStore, ServeParams
from coordinator.inference.text import TextCodec
from coordinator.store import Database
from swarm.errors import InvalidRequestError
from swarm.model.config import ModelConfig
from swarm.model.testing import make_tiny_checkpoint


def _files(d):
    out = []
    for p in sorted(d.iterdir()):
        out.append((p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()))
    return out


def _data(d, chunk=1000):
    for p in sorted(d.iterdir()):
        b = p.read_bytes()
        for i in range(0, len(b), chunk):
            yield p.name, b[i : i + chunk]


def test_upload_is_checked_against_the_announcement(tmp_path):
    src = tmp_path / "src"
    make_tiny_checkpoint(src, "gpt2", num_layers=2, hidden_size=32, num_heads=4)
    store = ModelStore(Database(tmp_path / "coord"), tmp_path / "coord")
    d, digest, size = store.receive("tiny", _files(src), _data(src))
    assert (d / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert size == sum(p.stat().st_size for p in src.iterdir()) and len(digest) == 64
    files = _files(src)
    corrupt = [(n, s, "0" * 64 if n == "config.json" else h) for n, s, h in files]
    with pytest.raises(InvalidRequestError, match="sha256"):
        store.receive("tiny2", corrupt, _data(src))
    with pytest.raises(InvalidRequestError, match="cut short"):
        store.receive("tiny3", files, ((n, b) for n, b in _data(src) if n != "config.json"))
    with pytest.raises(InvalidRequestError, match="invalid or repeated"):
        store.receive("tiny4", [("../evil.json", 1, "0" * 64)] + files, _data(src))
    with pytest.raises(InvalidRequestError, match="not announce"):
        store.receive("tiny5", files, iter([("other.json", b"x")]))
    with pytest.raises(InvalidRequestError, match="model name"):
        store.receive("bad name!", files, _data(src))
    assert not any(p.name.startswith(".upload") for p in (tmp_path / "coord" / "models").rglob("*"))
    store.close()


def test_model_shape_counts_bytes():
    cfg = ModelConfig(family="llama", vocab_size=1000, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, tie_word_embeddings=False)
    sh = model_shape(cfg, ServeParams(dtype="float16"))
    total = sh.layer_bytes * 4 + sh.embed_bytes + sh.head_bytes  # final norm is spread over the layers
    assert abs(total - cfg.num_parameters() * 2) <= 4 * 64 * 2
    assert sh.kv_bytes_per_token_per_layer == 2 * 2 * 16 * 2


def test_openai_fields():
    p = parse_sampling({"max_tokens": 5, "temperature": 0, "stop": "\n", "seed": 3})
    assert p.max_new_tokens == 5 and p.greedy and p.stop == ("\n",) and p.seed == 3
    assert parse_sampling({}).temperature == 1.0
    for bad in ({"temperature": 3}, {"max_tokens": 0}, {"max_tokens": 1.5}, {"top_p": 0}, {"n": 2},
                {"stop": [1]}, {"logprobs": 2}, {"temperature": "hot"}):
        with pytest.raises(InvalidRequestError):
            parse_sampling(bad)


def test_chat_prompt_template_and_fallback(tmp_path):
    d = tmp_path / "m"
    make_tiny_checkpoint(d, "gpt2", num_layers=1, hidden_size=32, num_heads=4)
    codec = TextCodec(d, vocab_size=400)
    msgs = [{"role": "user", "content": "hi"}]
    assert codec.chat_prompt(msgs) == "user: hi\nassistant:"
    (d / "tokenizer_config.json").write_text(
        '{"chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}'
        '{% if add_generation_prompt %}<assistant>{% endif %}"}')
    assert TextCodec(d, vocab_size=400).chat_prompt(msgs) == "<user>hi<assistant>"
    with pytest.raises(InvalidRequestError):
        codec.chat_prompt([{"role": "user"}])
    assert codec.decode(codec.encode("the swarm")) == "the swarm"


def test_auto_codec_uses_int8_on_slow_measured_links(tmp_path):
    import numpy as np

    from coordinator.inference.engine import InferenceEngine
    from coordinator.inference.sessions import StageRef
    from swarm.clock import FakeClock

    class Net:
        def matrix(self, ids):
            bw = {("a", "b"): 1e6, ("b", "c"): 1e9}.get(tuple(ids), float("nan"))
            return np.zeros((2, 2)), np.array([[np.inf, bw], [bw, np.inf]]), np.zeros((2, 2))

    class App:
        network = Net()
        clock = FakeClock()

    store = ModelStore(Database(tmp_path), tmp_path)
    engine = InferenceEngine(App(), store)
    try:
        ref = {n: StageRef(node_id=n, address="127.0.0.1:1", first_layer=0, last_layer_excl=1) for n in "abcd"}
        assert engine._hop_codec("auto", ref["a"], ref["b"]) == "int8"
        assert engine._hop_codec("auto", ref["b"], ref["c"]) == "none"
        assert engine._hop_codec("auto", ref["c"], ref["d"]) == "none"  # unmeasured
        assert engine._hop_codec("auto", ref["c"], None) == "none"
        assert engine._hop_codec("int8", ref["b"], ref["c"]) == "int8"
    finally:
        engine.close()
        store.close()


def test_prompt_tokens_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = tmp_path / "m"
    make_tiny_checkpoint(d, "llama", num_layers=1, hidden_size=32, num_heads=4)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    codec = TextCodec(d, vocab_size=400)
    for text in ("The swarm pools volunteer GPUs.", "  spaces\tand\nnewlines ", "ünïcödé ✓ 42"):
        assert codec.encode(text) == ref(text)["input_ids"]
        assert codec.decode(codec.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)


def test_a_model_stored_with_the_removed_lanes_option_still_loads(tmp_path):
    from pathlib import Path

    from coordinator.inference.store import ModelRecord

    store = ModelStore(Database(tmp_path), tmp_path)
    store.put(ModelRecord(name="old", digest="d" * 64, dir=Path(tmp_path), params=ServeParams(), state="ready",
                          error="", size_bytes=1, created_at_s=0.0))
    with store._conn:  # as a coordinator from before the removal of --lanes wrote it
        store._conn.execute("UPDATE inference_models SET params_json = ? WHERE name = 'old'",
                            ('{"lanes": 4, "dtype": "float16"}',))
    rec = store.get("old")
    assert rec.params.dtype == "float16" and not hasattr(rec.params, "lanes")


def test_suspicion_lasts_as_long_as_asked_and_a_failed_load_escalates(tmp_path):
    from coordinator.inference.engine import SUSPECT_S, InferenceEngine
    from coordinator.inference.healer import LOAD_SUSPECT_S, load_suspicion_s
    from swarm.clock import FakeClock

    class App:
        clock = FakeClock()

    store = ModelStore(Database(tmp_path), tmp_path)
    engine = InferenceEngine(App(), store)
    try:
        engine.suspect("dead")  # failed a step: the long default
        engine.suspect("spare", for_s=load_suspicion_s(0))  # answered, but a load on it failed once
        assert engine.suspects() == {"dead", "spare"}
        App.clock.advance(LOAD_SUSPECT_S + 0.1)
        assert engine.suspects() == {"dead"}  # the spare is tried again soon (a transient fault)
        engine.suspect("dead", for_s=1.0)  # a shorter suspicion never cuts a longer one short
        App.clock.advance(SUSPECT_S - LOAD_SUSPECT_S - 1.0)
        assert engine.suspects() == {"dead"}
        App.clock.advance(1.0)
        assert engine.suspects() == set()
    finally:
        engine.close()
        store.close()
    assert [load_suspicion_s(k) for k in range(3)] == [LOAD_SUSPECT_S, 2 * LOAD_SUSPECT_S, 4 * LOAD_SUSPECT_S]
    assert load_suspicion_s(100) == SUSPECT_S
