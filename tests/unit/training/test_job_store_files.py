"""Coordinator job pieces without a network: state machine, uploads, spec checks, planning."""

import hashlib

import numpy as np
import pytest
import torch

from swarm.clock import FakeClock
from swarm.errors import CapacityError, InfeasiblePlanError, InvalidRequestError, NotFoundError
from swarm.hardware import HardwareInfo
from swarm.membership import NodeInfo
from swarm.job_spec import JobSpec
from swarm.model.config import ModelConfig
from swarm.transport.transfer import FileHeader, FileReceiver

from coordinator.jobs.files import UploadLimits, prepare_job
from coordinator.jobs.planning import plan_job
from coordinator.jobs.store import JobStore
from coordinator.store import Database


def test_state_machine_allows_only_forward_moves(tmp_path):
    store = JobStore(Database(tmp_path), FakeClock())
    store.create(job_id="j1", spec=JobSpec(), model={}, num_samples=4, dataset_key="k", total_steps=3)
    assert store.get("j1").state == "pending"
    assert store.transition("j1", "succeeded") is None  # pending cannot succeed
    assert store.transition("j1", "running", plan={"d_pp": 1}, assignments=[], attempt=1).state == "running"
    assert store.transition("j1", "failed", reason="node lost").reason == "node lost"
    assert store.transition("j1", "running") is None  # terminal stays terminal
    with pytest.raises(NotFoundError):
        store.get("nope")
    store.add_progress("j1", attempt=1, stage=0, replica=0, step=0, loss=None, tokens=64, tokens_per_s=10.0,
                       bytes_sent=100, bytes_raw=400, step_s=1.0, compute_s=0.5, wait_s=0.2, comm_s=0.3)
    assert store.history("j1", num_reporters=2) == []
    store.add_progress("j1", attempt=1, stage=1, replica=0, step=0, loss=2.5, tokens=64, tokens_per_s=10.0,
                       bytes_sent=0, bytes_raw=0, step_s=2.0, compute_s=1.0, wait_s=0.5, comm_s=0.5)
    (h,) = store.history("j1", num_reporters=2)
    assert h["loss"] == 2.5 and h["tokens_per_s"] == 32.0 and h["bytes_saved"] == 300


def test_history_counts_a_past_attempts_step_once_every_stage_reported_it(tmp_path):
    """A fence ran some steps of attempt 1 with one of its two pipelines (the other was lost);
    attempt 2 (current) runs two pipelines again: every committed step shows, nothing else."""
    store = JobStore(Database(tmp_path), FakeClock())
    store.create(job_id="j", spec=JobSpec(), model={}, num_samples=4, dataset_key="k", total_steps=9)

    def report(attempt, step, workers):
        for stage, replica in workers:
            store.add_progress("j", attempt=attempt, stage=stage, replica=replica, step=step,
                               loss=1.0 if stage == 1 else None, tokens=8, tokens_per_s=1.0, bytes_sent=0,
                               bytes_raw=0, step_s=1.0, compute_s=1.0, wait_s=0.0, comm_s=0.0)

    both = [(0, 0), (1, 0), (0, 1), (1, 1)]
    report(1, 0, both)
    report(1, 1, [(0, 0), (1, 0)])  # the fence: pipeline 0 alone
    report(1, 2, [(0, 0)])  # stage 1 never ran it: not committed
    report(2, 2, both[:3])  # the current attempt, one worker behind
    assert [h["step"] for h in store.history("j", num_reporters=4, attempt=2)] == [0, 1]
    report(2, 2, [(1, 1)])
    assert [(h["step"], h["attempt"]) for h in store.history("j", num_reporters=4, attempt=2)] == [(0, 1), (1, 1), (2, 2)]



def test_history_shows_a_step_a_later_attempt_resumed_after_though_a_report_of_it_is_missing(tmp_path):
    """Stage 1 uploaded its checkpoint of step 2 (the state after step 1) and was killed before
    its report of step 1 got out; attempt 2 resumed at step 2 from that complete checkpoint, so
    step 1 was done by every stage and shows (seen in CI: a step missing from the progress)."""
    store = JobStore(Database(tmp_path), FakeClock())
    store.create(job_id="j", spec=JobSpec(), model={}, num_samples=4, dataset_key="k", total_steps=4)

    def report(attempt, step, stages):
        for stage in stages:
            store.add_progress("j", attempt=attempt, stage=stage, replica=0, step=step,
                               loss=1.0 if stage == 1 else None, tokens=8, tokens_per_s=1.0, bytes_sent=0,
                               bytes_raw=0, step_s=1.0, compute_s=1.0, wait_s=0.0, comm_s=0.0)

    report(1, 0, [0, 1])
    report(1, 1, [0])  # stage 1's report of step 1 was lost with the node
    report(1, 2, [0])  # stage 0 ran on; stage 1 never did step 2
    report(2, 2, [0, 1])
    assert [h["step"] for h in store.history("j", num_reporters=2, attempt=2)] == [0, 2]
    store.add_event("j", "resumed", "resumed at step 2 (attempt 2)", step=2, attempt=2)
    assert [(h["step"], h["attempt"]) for h in store.history("j", num_reporters=2, attempt=2)] == [(0, 1), (1, 1), (2, 2)]
    store.add_event("j", "resumed", "not json fields", step="2", attempt=None)  # malformed: ignored
    assert [h["step"] for h in store.history("j", num_reporters=2, attempt=2)] == [0, 1, 2]

def _receive(tmp_path, files, limits=UploadLimits()):
    r = FileReceiver(tmp_path / "up", roots=("data", "checkpoint"), limits=limits)
    for name, data, sha in files:
        r.start(FileHeader(name=name, size_bytes=len(data), sha256=sha or hashlib.sha256(data).hexdigest()))
        r.write(data)
    return r.finish()


def test_uploads_check_names_sizes_and_digests(tmp_path):
    assert _receive(tmp_path, [("data/a.txt", b"hello", None)])[0].as_posix() == "data/a.txt"
    with pytest.raises(InvalidRequestError, match="SHA-256"):
        _receive(tmp_path, [("data/b.txt", b"hello", "0" * 64)])
    for bad in ("../x", "/etc/passwd", "data/../../x", "other/x", "data"):
        with pytest.raises(InvalidRequestError):
            _receive(tmp_path, [(bad, b"x", None)])
    with pytest.raises(CapacityError):
        _receive(tmp_path, [("data/c.txt", b"x" * 100, None)], UploadLimits(max_total_bytes=10, max_file_bytes=10))


def test_spec_validation_names_the_flag():
    assert JobSpec.from_dict({}).epochs == 1.0
    with pytest.raises(InvalidRequestError, match="micro-batch"):
        JobSpec.from_dict({"batch_size": 6, "micro_batch_size": 4})
    with pytest.raises(Exception, match="codec"):
        JobSpec.from_dict({"compression": "zip:9"})


def test_prepare_job_tokenises_and_unties(tmp_path):
    from swarm.model.testing import make_tiny_checkpoint

    jdir = tmp_path / "job"
    make_tiny_checkpoint(jdir / "upload" / "checkpoint", num_layers=2, hidden_size=16, num_heads=2)
    (jdir / "upload" / "data").mkdir(parents=True)
    (jdir / "upload" / "data" / "t.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    prepared = prepare_job(jdir, seq_len=8, seed=0)
    assert not prepared.config.tie_word_embeddings and prepared.dataset.num_samples > 4
    assert (jdir / "init" / "tokenizer.json").is_file() and (jdir / "data.npy").is_file()
    with pytest.raises(InvalidRequestError, match="max_position"):
        prepare_job(jdir, seq_len=10_000, seed=0)


def test_prepare_job_from_a_bare_config_initialises_byte_level_llama(tmp_path):
    import json

    from swarm.model.checkpoint import load_checkpoint

    cfg = ModelConfig(family="llama", vocab_size=260, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=32, max_position_embeddings=64)
    jdir = tmp_path / "job"
    (jdir / "upload" / "checkpoint").mkdir(parents=True)
    (jdir / "upload" / "checkpoint" / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    (jdir / "upload" / "data").mkdir(parents=True)
    (jdir / "upload" / "data" / "t.txt").write_text("bytes are tokens here " * 10)
    prepared = prepare_job(jdir, seq_len=8, seed=3)
    assert prepared.dataset.tokens.max() < 256  # byte-level ids
    a = load_checkpoint(jdir / "init").tensors
    again = prepare_job(jdir, seq_len=8, seed=3)  # seeded: the same fresh weights
    b = load_checkpoint(jdir / "init").tensors
    assert again.dataset.key == prepared.dataset.key and all(torch.equal(a[k], b[k]) for k in a)


def _node(i: int) -> NodeInfo:
    hw = HardwareInfo(device="cpu", device_kind="cpu", device_name="cpu", memory_bytes=1 << 30,
                      memory_free_bytes=1 << 30, cpu_cores=2, ram_bytes=1 << 30, disk_free_bytes=1 << 30,
                      tflops=0.1, tflops_dtype="float32")
    return NodeInfo(id=f"node{i}", name=f"n{i}", state="online", hardware=hw, peer_address=f"127.0.0.1:{9000 + i}",
                    registered_at_s=0, last_seen_at_s=0)


def test_planning_gives_each_node_its_neighbours():
    cfg = ModelConfig(family="gpt2", vocab_size=64, hidden_size=32, num_layers=4, num_heads=4)
    spec = JobSpec(batch_size=4, micro_batch_size=2, seq_len=16, num_stages=2, num_replicas=2)
    nodes = [_node(i) for i in range(4)]
    nan = np.full((4, 4), np.nan)
    jp = plan_job(spec=spec, config=cfg, nodes=nodes, delay_s=nan, bandwidth_Bps=nan)
    by = {(a["stage"], a["replica"]): a for a in jp.assignments}
    assert set(by) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for r in range(2):
        assert by[(0, r)]["next"]["node_id"] == by[(1, r)]["node_id"] and by[(0, r)]["prev"] is None
        assert by[(1, r)]["prev"]["node_id"] == by[(0, r)]["node_id"] and by[(1, r)]["next"] is None
    assert by[(0, 0)]["last_layer_excl"] == by[(1, 0)]["first_layer"]
    with pytest.raises(InfeasiblePlanError, match="idle"):
        plan_job(spec=spec.replace(num_stages=3), config=cfg, nodes=nodes, delay_s=nan, bandwidth_Bps=nan)
    with pytest.raises(InfeasiblePlanError, match="no nodes"):
        plan_job(spec=spec, config=cfg, nodes=[], delay_s=nan, bandwidth_Bps=nan)
