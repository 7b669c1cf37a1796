"""A newcomer's training inputs: a bare config.json gets a real (byte-level) tokenizer in the
export, vocab_size is checked against it at submit, and bad files are refused naming the file
the user uploaded (not the coordinator's paths), locally in the CLI where possible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save as st_save

from coordinator.jobs.files import assemble_result, prepare_job
from swarm.cli.train import upload_files
from swarm.errors import ConfigError, InvalidRequestError
from swarm.model.checkpoint import load_checkpoint
from swarm.model.config import ModelConfig
from swarm.model.testing import make_tiny_checkpoint
from swarm.model.tokenizer import ByteTokenizer, HFTokenizer, check_byte_vocab, save_byte_tokenizer

TEXT = "héllo wörld, bytes are tokens 🙂\n" * 8
BYTE_GPT2 = ModelConfig(family="gpt2", vocab_size=257, hidden_size=32, num_layers=2, num_heads=4,
                        max_position_embeddings=64, eos_token_id=256)


def _job(tmp_path: Path, config: dict | str | None = None, data: bytes | None = TEXT.encode(),
         data_name: str = "corpus.txt") -> Path:
    jdir = tmp_path / "job"
    ckpt, d = jdir / "upload" / "checkpoint", jdir / "upload" / "data"
    ckpt.mkdir(parents=True)
    d.mkdir(parents=True)
    cfg = BYTE_GPT2.to_hf_config() if config is None else config
    (ckpt / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    if data is not None:
        (d / data_name).write_bytes(data)
    return jdir


def test_byte_tokenizer_json_loads_in_transformers_and_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = BYTE_GPT2.to_hf_config()
    save_byte_tokenizer(tmp_path, cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for tok in (fast, auto):
        assert len(tok) == 257  # 256 bytes + eos
        ids = tok.encode(TEXT)
        assert ids == ByteTokenizer().encode(TEXT)  # the ids the training used
        assert tok.decode(ids) == TEXT
    assert auto.eos_token_id == 256
    ours = HFTokenizer(tmp_path / "tokenizer.json")
    assert ours.encode(TEXT) == list(TEXT.encode()) and ours.decode(ours.encode(TEXT)) == TEXT


def test_byte_vocab_mismatch_says_what_to_pass():
    with pytest.raises(ConfigError, match=r"vocab_size 50257 but no tokenizer: pass a checkpoint directory with "
                                          r"tokenizer.json.*set vocab_size to 256\.\.264"):
        check_byte_vocab({"vocab_size": 50257})
    with pytest.raises(ConfigError, match="eos_token_id 50256"):
        check_byte_vocab({"vocab_size": 257, "eos_token_id": 50256})
    assert check_byte_vocab({"vocab_size": 256}) == {}


def test_training_from_a_bare_config_exports_a_real_tokenizer(tmp_path):
    jdir = _job(tmp_path)
    prepared = prepare_job(jdir, seq_len=16, seed=0)
    assert (jdir / "init" / "tokenizer.json").is_file()
    assert int(prepared.dataset.tokens[: len(TEXT.encode())].max()) < 257
    # the stages' weights merged into result/ carry the tokenizer with them
    stage = tmp_path / "stage0"
    stage.mkdir()
    (stage / "weights.safetensors").write_bytes(st_save(load_checkpoint(jdir / "init").tensors))
    out = assemble_result(jdir, prepared.config, [stage])
    tok = HFTokenizer(out / "tokenizer.json")
    assert tok.vocab_size == 257 and tok.decode(tok.encode(TEXT)) == TEXT
    assert (out / "tokenizer_config.json").is_file()


def test_gpt2_vocab_without_tokenizer_is_refused_at_submit(tmp_path):
    cfg = dict(BYTE_GPT2.to_hf_config(), vocab_size=50257, eos_token_id=None)
    with pytest.raises(InvalidRequestError, match="vocab_size 50257 but no tokenizer"):
        prepare_job(_job(tmp_path, cfg), seq_len=16, seed=0)


@pytest.mark.parametrize("config, data, data_name, expect", [
    (None, b"", "corpus.txt", r"data/corpus.txt holds no text"),
    (None, b"   \n\n", "corpus.txt", r"data/corpus.txt holds no text"),
    (None, b"\x7fELF\x02\x01\x01\x00\x00" + bytes(range(256)) * 40, "ls", r"data/ls is not text"),
    (None, bytes(range(128, 256)) * 40, "latin.txt", r"data/latin.txt is not UTF-8 text"),
    ("garbage{", TEXT.encode(), "corpus.txt", r"cannot read checkpoint/config.json: it is not a JSON file"),
    ("[1, 2]", TEXT.encode(), "corpus.txt", r"checkpoint/config.json holds a JSON list"),
])
def test_bad_uploads_are_reported_with_the_uploaded_name(tmp_path, config, data, data_name, expect):
    jdir = _job(tmp_path, config, data, data_name)
    with pytest.raises(InvalidRequestError, match=expect) as info:
        prepare_job(jdir, seq_len=16, seed=0)
    assert str(tmp_path) not in str(info.value)  # no coordinator-internal path


def test_corrupt_safetensors_is_invalid_input_naming_the_file(tmp_path):
    jdir = _job(tmp_path)
    ckpt = jdir / "upload" / "checkpoint"
    make_tiny_checkpoint(ckpt, num_layers=2, hidden_size=32, num_heads=4, max_position_embeddings=64)
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidRequestError, match=r"checkpoint/model.safetensors is not a valid safetensors file") as info:
        prepare_job(jdir, seq_len=16, seed=0)
    assert str(tmp_path) not in str(info.value)


def test_cli_checks_data_and_config_before_uploading(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(BYTE_GPT2.to_hf_config()))
    good = tmp_path / "corpus.txt"
    good.write_text(TEXT)
    binary = tmp_path / "ls"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" * 100)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(InvalidRequestError, match=r"ls is not text"):
        upload_files(cfg, binary)
    with pytest.raises(InvalidRequestError, match=r"empty.txt holds no text"):
        upload_files(cfg, empty)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("not json")
    with pytest.raises(InvalidRequestError, match=r"garbage.json is not a JSON file"):
        upload_files(garbage, good)
    names = [f.name for f in upload_files(cfg, good)]
    assert names == ["checkpoint/config.json", "data/corpus.txt"]


def test_cli_tokenizer_flag_uploads_it_as_the_checkpoints_tokenizer(tmp_path):
    from swarm.cli import build_parser

    model = tmp_path / "model"
    make_tiny_checkpoint(model, num_layers=1, hidden_size=32, num_heads=4)
    tok = tmp_path / "mine.json"
    tok.write_text((model / "tokenizer.json").read_text())
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    args = build_parser().parse_args(["train", "--model", str(model), "--data", str(data), "--tokenizer", str(tok)])
    files = upload_files(Path(args.model), Path(args.data), args.tokenizer)
    by_name = {f.name: f.path for f in files}
    assert by_name["checkpoint/tokenizer.json"] == tok  # the flag's file, not the directory's
    assert [f.name for f in files].count("checkpoint/tokenizer.json") == 1
    with pytest.raises(InvalidRequestError, match="--tokenizer"):
        upload_files(model, data, tmp_path / "missing.json")
