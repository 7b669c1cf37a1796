"""JobSpec: one typed spec from the CLI to the node; its JSON, its protobuf, old stored rows."""

import json

import numpy as np
import pytest

from swarm.clock import FakeClock
from swarm.compression import CodecSpec
from swarm.errors import InvalidRequestError
from swarm.job_spec import JobSpec
from swarm.model.config import ModelConfig
from swarm.transport.jobs import job_spec_from_pb, job_spec_to_pb

from coordinator.jobs.planning import plan_job
from coordinator.jobs.store import JobStore
from coordinator.store import Database

# what coordinators before JobSpec stored: normalize_spec's dict, the codec as the user typed it
OLD_ROW = {"name": "", "steps": 0, "epochs": 1.0, "batch_size": 8, "micro_batch_size": 2, "seq_len": 64, "lr": 3e-4,
           "compression": "aqsgd:fw=2,bw=4", "checkpoint_every": 0, "seed": 0, "warmup_steps": 0, "weight_decay": 0.0,
           "grad_clip": 1.0, "schedule": "1f1b", "num_stages": 0, "num_replicas": 0, "peer_timeout_s": 30.0,
           "min_lr_ratio": 0.1}
ALL_SET = JobSpec(name="n", steps=7, epochs=2.0, batch_size=12, micro_batch_size=3, seq_len=32, lr=1e-3,
                  codec=CodecSpec.parse("aqsgd:fw=3,bw=6,g=64,ef=1,seed=2"), checkpoint_every=2, seed=5, warmup_steps=1,
                  weight_decay=0.01, grad_clip=0.5, schedule="gpipe", num_stages=2, num_replicas=3, peer_timeout_s=9.0,
                  min_lr_ratio=0.2)


def test_defaults_and_normalisation():
    spec = JobSpec()
    assert spec.epochs == 1.0 and spec.codec == CodecSpec(kind="none") and spec.min_lr_ratio == 0.1
    assert JobSpec(steps=5).epochs == 0.0
    assert JobSpec(lr=1).lr == 1.0 and isinstance(JobSpec(lr=1).lr, float)
    for bad, flag in [(dict(seq_len=0), "--seq-len"), (dict(lr=0.0), "--lr"), (dict(steps=-1), "--steps"),
                      (dict(schedule="zigzag"), "schedule"), (dict(num_stages=-1), "stages"),
                      (dict(peer_timeout_s=0.1), "peer timeout"), (dict(lr=float("nan")), "finite")]:
        with pytest.raises(InvalidRequestError, match=flag):
            JobSpec(**bad)
    with pytest.raises(InvalidRequestError, match="CodecSpec"):
        JobSpec(codec="none")
    with pytest.raises(InvalidRequestError, match="--compression"):
        JobSpec.from_dict({"compression": "aqsgd:fw=9"})


def test_json_keeps_todays_keys_and_round_trips():
    d = ALL_SET.to_dict()
    assert list(d) == list(OLD_ROW) and d["compression"] == "aqsgd:fw=3,bw=6,g=64,ef=1,seed=2"
    assert JobSpec.from_json(ALL_SET.to_json()) == ALL_SET
    assert json.loads(JobSpec.from_dict(OLD_ROW).to_json()) == OLD_ROW  # old rows read back unchanged
    for text in ("none", "direct:fw=4,bw=8", "aqsgd:fw=2,bw=4", "direct:fw=8,bw=raw,g=channel,fwround=sr", "aqsgd:fw=2,bw=4,first=8"):
        assert str(CodecSpec.parse(text)) == text and CodecSpec.parse(str(CodecSpec.parse(text))) == CodecSpec.parse(text)


def test_protobuf_round_trip_carries_every_field():
    m = job_spec_to_pb(ALL_SET)
    assert {f.name for f, _ in m.ListFields()} == set(ALL_SET.to_dict())  # every field set on the wire
    assert job_spec_from_pb(m) == ALL_SET
    empty = type(m)(batch_size=8, micro_batch_size=2, seq_len=64, lr=3e-4, peer_timeout_s=30.0)
    assert job_spec_from_pb(empty).codec.kind == "none" and job_spec_from_pb(empty).schedule == "1f1b"


def test_store_reads_old_rows_and_refuses_unreadable_ones(tmp_path):
    store = JobStore(Database(tmp_path), FakeClock())
    store.create(job_id="new", spec=ALL_SET, model={}, num_samples=4, dataset_key="k", total_steps=3)
    store.create(job_id="old", spec=ALL_SET, model={}, num_samples=4, dataset_key="k", total_steps=3)
    store.create(job_id="bad", spec=ALL_SET, model={}, num_samples=4, dataset_key="k", total_steps=3)
    conn = store._conn
    with conn:
        conn.execute("UPDATE jobs SET spec_json = ? WHERE id = 'old'", (json.dumps({"steps": 3, "compression": "direct:fw=4"}),))
        conn.execute("UPDATE jobs SET spec_json = ? WHERE id = 'bad'", (json.dumps({"batch_size": "many"}),))
    assert store.get("new").spec == ALL_SET
    old = store.get("old").spec
    assert old.steps == 3 and old.codec == CodecSpec.parse("direct:fw=4,bw=8") and old.batch_size == 8
    with pytest.raises(InvalidRequestError, match="job bad .*batch_size"):
        store.get("bad")
    assert {j.id for j in store.list()} == {"new", "old"}  # one bad row does not hide the others


def test_planner_prices_both_directions_of_the_codec(monkeypatch):
    from coordinator.jobs import planning
    from tests.unit.training.test_job_store_files import _node

    seen = []
    real = planning.plan_training
    monkeypatch.setattr(planning, "plan_training", lambda cluster, shape, **kw: seen.append(shape) or real(cluster, shape, **kw))
    cfg = ModelConfig(family="gpt2", vocab_size=64, hidden_size=32, num_layers=4, num_heads=4)
    nan = np.full((2, 2), np.nan)
    for text in ("none", "aqsgd:bw=4"):
        plan_job(spec=JobSpec(batch_size=4, seq_len=16, codec=CodecSpec.parse(text)), config=cfg,
                 nodes=[_node(0), _node(1)], delay_s=nan, bandwidth_Bps=nan)
    assert (seen[0].act_bytes_per_value, seen[0].act_grad_bytes_per_value) == (4.0, 4.0)  # float32 on the wire
    assert (seen[1].act_bytes_per_value, seen[1].act_grad_bytes_per_value) == (0.5 + 4 / 128, 0.5 + 4 / 128)
