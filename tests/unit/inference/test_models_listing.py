"""`swarm models`: the replica count beside the replicas list, in JSON and in text."""

from __future__ import annotations

import pytest

from swarm.cli.serve import _print_model
from swarm.proto.v1 import inference_pb2 as ipb
from swarm.transport.coordinator_client import model_record

pytestmark = pytest.mark.timeout(10)


def _info(**kw) -> ipb.ServeModelInfo:
    info = ipb.ServeModelInfo(name="tiny", family="llama", num_layers=4, digest="ab" * 32, state="degraded",
                              max_seq_len=128, **kw)
    info.replicas.append(ipb.ServeReplicaInfo(replica=1, state="ready", predicted_latency_s=0.002, stages=[
        ipb.ServeStageInfo(node_id="n" * 16, address="127.0.0.1:1", first_layer=0, last_layer_excl=4, state="ready")]))
    return info


def test_json_keeps_every_key_and_adds_the_replica_count():
    j = model_record(_info(healthy_replicas=1, requested_replicas=2, healing="no spare node")).to_json()
    assert {"name", "family", "num_layers", "digest", "state", "size_bytes", "max_seq_len", "created_at", "error",
            "replicas"} <= set(j)
    assert j["replica_count"] == {"healthy": 1, "requested": 2} and j["healing"] == "no spare node"
    assert j["replicas"][0]["stages"][0]["last_layer_excl"] == 4


def test_text_shows_the_count_and_why_it_waits(capsys):
    _print_model(model_record(_info(healthy_replicas=1, requested_replicas=2, healing="no spare node")))
    out = capsys.readouterr().out
    assert "replicas 1/2 healthy" in out and "healing: no spare node" in out
    _print_model(model_record(_info(healthy_replicas=2, requested_replicas=2)))
    assert "healing" not in capsys.readouterr().out


def test_nodes_on_probation_show_per_model_and_per_replica(capsys):
    rec = model_record(_info(verify_prob=0.05, probation_node_ids=["n" * 16]))
    j = rec.to_json()
    assert j["verification"]["probation"] == ["n" * 16] and j["replicas"][0]["probation"] == ["n" * 16]
    assert model_record(_info()).to_json()["replicas"][0]["probation"] == []
    _print_model(rec)
    assert "probation (every window of their chains checked): nnnnnnnnnnnn" in capsys.readouterr().out
