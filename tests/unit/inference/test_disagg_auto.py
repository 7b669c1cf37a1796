"""The coordinator's glue for `--disaggregate auto` (coordinator/inference/disagg.py
``place_if_chosen``), in process with a fake engine: it predicts on the candidate nodes, places
disaggregated only when the decision says so, falls back to colocated when that placement is
infeasible, and `swarm models`'s ``disaggregation`` says the mode and why."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from coordinator.inference.disagg import Disagg
from coordinator.inference.store import ServeParams
from swarm.errors import InfeasiblePlanError
from swarm.model.config import ModelConfig
from swarm.proto.v1 import inference_pb2 as pb
from swarm.scheduling.placement import Links, PlacementDevice

# layers large enough (~16 MB) that a decode step is memory-bound: the prediction depends on it
CFG = ModelConfig(family="llama", vocab_size=1000, hidden_size=1024, num_layers=4, num_heads=8, num_kv_heads=8,
                  intermediate_size=4096, tie_word_embeddings=False)


class FakeEngine:
    """The engine methods Disagg's decision uses: candidate nodes (4, or as given) and their links."""

    def __init__(self, tflops=(2.0, 2.0, 2.0, 2.0)) -> None:
        self.devices = [PlacementDevice(node_id=f"n{i}", tflops=t, memory_bytes=1 << 34) for i, t in enumerate(tflops)]
        self.candidate_calls = 0

    def _candidates(self, m, exclude):
        self.candidate_calls += 1
        return [SimpleNamespace(id=d.node_id) for d in self.devices], list(self.devices)

    def _links(self, ids):
        n = len(ids)
        return Links(delay_s=tuple(tuple(0.0 if i == j else 1e-4 for j in range(n)) for i in range(n)),
                     bandwidth_Bps=tuple(tuple(float("inf") if i == j else 1e9 for j in range(n)) for i in range(n)))


def model(**params) -> SimpleNamespace:
    p = ServeParams(num_stages=2, max_seq_len=256, **params)
    return SimpleNamespace(record=SimpleNamespace(name="tiny", params=p), config=CFG, replicas=[], loading=[])


def described(d: Disagg, m) -> pb.ServeDisaggInfo:
    info = pb.ServeDisaggInfo()
    d.describe(m, info, full=True)
    return info


MEM_RICH = {"n0": 2e10, "n1": 2e10, "n2": 1e12, "n3": 1e12}


@pytest.fixture
def memory_rich_decode():
    """Nodes n2, n3 measured 50x the memory bandwidth of n0, n1 (what they reported at
    registration, as the registry believes it): the HexGen-2 case that predicts a gain."""
    models = {"n0": "compute-rich", "n1": "compute-rich", "n2": "memory-rich", "n3": "memory-rich"}
    nodes = {i: registered(bw, models[i]) for i, bw in MEM_RICH.items()}
    return SimpleNamespace(registry=SimpleNamespace(get=nodes.__getitem__))


def registered(mem_bandwidth_Bps, device_name: str) -> SimpleNamespace:
    """What Disagg reads of a registered node: its believed bandwidth and its device model."""
    return SimpleNamespace(planning_mem_bandwidth_Bps=mem_bandwidth_Bps,
                           hardware=SimpleNamespace(device_kind="cuda", device_name=device_name))


def test_auto_on_alike_nodes_serves_colocated_and_says_why():
    e = FakeEngine()
    d = Disagg(e)
    m = model(num_replicas=None, verify_prob=0.0)
    assert d.place_if_chosen(m) is False
    info = described(d, m)
    assert info.mode == "auto" and not info.enabled and not info.requested
    assert "is under 1.15x" in info.reason and info.predicted_gain < 1.0
    assert d.kv_sources(m, SimpleNamespace(index=1), 0) == []  # no roles: nothing may push KV


def test_auto_blocked_by_the_options_does_not_even_predict():
    e = FakeEngine()
    d = Disagg(e)
    assert d.place_if_chosen(model(num_replicas=1)) is False  # one chain: nothing to split
    assert e.candidate_calls == 0


def test_default_spot_checks_leave_auto_free_to_engage(memory_rich_decode):
    e = FakeEngine(tflops=(8.0, 8.0, 2.0, 2.0))
    e.app = memory_rich_decode
    d = Disagg(e)
    placed = []
    d.place = lambda m, plan=None: placed.append(plan)
    m = model(num_replicas=None)  # --verify-prob at its default, 0.05
    assert m.record.params.verify_prob > 0
    assert d.place_if_chosen(m) is True and placed[0].enabled


def test_auto_with_a_predicted_gain_places_disaggregated(memory_rich_decode):
    e = FakeEngine(tflops=(8.0, 8.0, 2.0, 2.0))
    e.app = memory_rich_decode
    d = Disagg(e)
    placed = []
    d.place = lambda m, plan=None: placed.append(plan)
    assert d.place_if_chosen(model(num_replicas=None, verify_prob=0.0)) is True
    (plan,) = placed
    assert plan.enabled and plan.reason.startswith("auto: disaggregated: predicted gain")
    assert set(plan.prefill_nodes) == {"n0", "n1"}


def test_auto_falls_back_to_colocated_when_the_split_cannot_be_placed(memory_rich_decode):
    e = FakeEngine(tflops=(8.0, 8.0, 2.0, 2.0))
    e.app = memory_rich_decode
    d = Disagg(e)

    def infeasible(m, plan=None):
        raise InfeasiblePlanError("the prefill nodes could not hold 2 stage(s) each; lower --stages")
    d.place = infeasible
    m = model(num_replicas=None, verify_prob=0.0)
    assert d.place_if_chosen(m) is False
    info = described(d, m)
    assert not info.enabled and info.mode == "auto"
    assert info.reason.startswith("auto: the disaggregated placement failed (the prefill nodes could not hold")


def test_a_reupload_decides_afresh():
    d = Disagg(FakeEngine())
    m = model(num_replicas=None, verify_prob=0.0)
    d.place_if_chosen(m)
    off = model(num_replicas=None, verify_prob=0.0, disaggregate="off")
    assert d.place_if_chosen(off) is False
    assert described(d, off).reason == ""  # the old auto decision is gone; assess records off once placed


def test_the_same_nodes_without_measured_bandwidth_predict_no_gain():
    """Unmeasured (older nodes): bandwidth assumed proportional to TFLOPS, no decode advantage."""
    e = FakeEngine(tflops=(8.0, 8.0, 2.0, 2.0))
    e.app = SimpleNamespace(registry=SimpleNamespace(get=lambda i: registered(None, f"gpu-{i}")))
    d = Disagg(e)
    m = model(num_replicas=None, verify_prob=0.0)
    assert d.place_if_chosen(m) is False
    assert not described(d, m).enabled


def test_nodes_of_one_device_model_measuring_differently_are_alike():
    """Two CPUs of one model on a loaded box measured 4x apart: noise, not a split to exploit."""
    e = FakeEngine(tflops=(8.0, 8.0, 2.0, 2.0))
    e.app = SimpleNamespace(registry=SimpleNamespace(get=lambda i: registered(MEM_RICH[i], "one cpu")))
    d = Disagg(e)
    m = model(num_replicas=None)
    assert d.place_if_chosen(m) is False
    info = described(d, m)
    assert not info.enabled and "alike" in info.reason
