"""When a model is served disaggregated (`swarm serve --disaggregate {auto,on,off}`): the pure
decision (swarm/scheduling/disaggregation.py), the serve options that carry the mode from the
flag to the coordinator, and what `swarm models --json` says about it."""

from __future__ import annotations

import json

import pytest

from coordinator.inference.servicer import params_from_header
from coordinator.inference.store import DEFAULT_VERIFY_PROB, ServeParams, _params_from_json
from swarm.cli import build_parser
from swarm.errors import InvalidRequestError
from swarm.proto.v1 import inference_pb2 as pb
from swarm.scheduling.disaggregation import (AUTO_MIN_GAIN, Workload, auto_blocker, decide_disaggregation,
                                              plan_disaggregation)
from swarm.scheduling.placement import Links, ModelShape, PlacementDevice
from swarm.transport.client_records import DisaggRecord, ServeOptions

SHAPE = ModelShape(num_layers=8, hidden_size=1024, layer_bytes=50_000_000, embed_bytes=100_000_000,
                   head_bytes=100_000_000, kv_bytes_per_token_per_layer=8192, flops_per_token_per_layer=1e8,
                   activation_bytes_per_token=4096)


def links(n: int) -> Links:
    """Every pair 1 GB/s, 0.1 ms."""
    return Links(delay_s=tuple(tuple(0.0 if i == j else 1e-4 for j in range(n)) for i in range(n)),
                 bandwidth_Bps=tuple(tuple(float("inf") if i == j else 1e9 for j in range(n)) for i in range(n)))


def devs(tflops: list[float]) -> list[PlacementDevice]:
    return [PlacementDevice(node_id=f"n{i}", tflops=t, memory_bytes=1 << 34) for i, t in enumerate(tflops)]


ALLOWED = dict(routes=False, num_replicas=2)


# ----------------------------------------------------------------------------- the pure decision
def test_auto_enables_only_at_or_above_the_threshold():
    above = decide_disaggregation("auto", predicted_gain=AUTO_MIN_GAIN + 0.01, prediction="why")
    assert above.enabled and above.mode == "auto"
    assert above.reason.startswith(f"auto: disaggregated: predicted gain {AUTO_MIN_GAIN + 0.01:.2f}x")
    assert above.reason.endswith("; why")
    assert decide_disaggregation("auto", predicted_gain=AUTO_MIN_GAIN).enabled  # the threshold itself counts
    below = decide_disaggregation("auto", predicted_gain=1.04, min_gain=1.15)
    assert not below.enabled
    assert "predicted gain 1.04x is under 1.15x" in below.reason and "--disaggregate on forces it" in below.reason


@pytest.mark.parametrize("options, words", [
    (dict(ALLOWED, routes=True), "--routes"),
    (dict(ALLOWED, num_replicas=1), "--replicas 2"),
])
def test_options_that_forbid_auto_keep_it_off_whatever_the_gain(options, words):
    blocker = auto_blocker(**options)
    assert words in blocker
    d = decide_disaggregation("auto", blocker=blocker, predicted_gain=10.0)
    assert not d.enabled and d.reason.startswith("auto: not disaggregated: ") and words in d.reason


def test_options_that_allow_auto():
    assert auto_blocker(**ALLOWED) == ""
    assert auto_blocker(routes=False, num_replicas=None) == ""  # --replicas 0: as many as fit


def test_too_few_nodes_keep_auto_off_and_say_so():
    plan = plan_disaggregation(devs([8.0, 1.0, 1.0]), links(3), SHAPE, num_stages=2, mode="auto")
    assert not plan.enabled and not plan.prefill_chains
    assert plan.reason == "auto: not disaggregated; 3 node(s) make fewer than 2 chains of 2"
    off = plan_disaggregation(devs([8.0, 1.0, 1.0]), links(3), SHAPE, num_stages=2, mode="off")
    assert not off.enabled and "--disaggregate off" in off.reason


def test_on_always_disaggregates_and_off_never_does():
    assert decide_disaggregation("on", predicted_gain=0.5).enabled
    assert "because --disaggregate on asked for it" in decide_disaggregation("on", predicted_gain=0.5).reason
    assert decide_disaggregation("on", blocker="ignored", predicted_gain=None).enabled
    off = decide_disaggregation("off", predicted_gain=10.0)
    assert not off.enabled and off.reason.startswith("not disaggregated: --disaggregate off")
    with pytest.raises(InvalidRequestError, match="auto, on, off"):
        decide_disaggregation("yes", predicted_gain=2.0)


def _hexgen_case(**kw):
    # compute-rich nodes with little memory bandwidth, and memory-rich ones: a predicted gain
    d = devs([8.0, 8.0, 2.0, 2.0])
    mem = {"n0": 2e10, "n1": 2e10, "n2": 1e12, "n3": 1e12}
    return plan_disaggregation(d, links(4), SHAPE, num_stages=2, mem_bandwidth_Bps=mem,
                               workload=Workload(prompt_tokens=1024, response_tokens=32, batch_sessions=8), **kw)


def test_the_plan_applies_the_decision_for_its_mode_and_blocker():
    auto = _hexgen_case(mode="auto")
    assert auto.predicted_gain >= AUTO_MIN_GAIN and auto.enabled and auto.reason.startswith("auto: disaggregated")
    blocked = _hexgen_case(mode="auto", blocker=auto_blocker(**dict(ALLOWED, routes=True)))
    assert not blocked.enabled and blocked.predicted_gain == auto.predicted_gain  # the prediction is still shown
    assert not _hexgen_case(mode="off").enabled
    alike = plan_disaggregation(devs([2.0] * 4), links(4), SHAPE, num_stages=2, mode="auto")
    assert not alike.enabled and "is under" in alike.reason and "alike" in alike.reason


# ----------------------------------------------------------------------------- flag -> coordinator
def test_cli_flag_bare_means_on_and_the_default_is_auto():
    p = build_parser()
    base = ["serve", "--model", "ckpt"]
    assert p.parse_args(base).disaggregate == "auto"
    assert p.parse_args(base + ["--disaggregate"]).disaggregate == "on"
    assert p.parse_args(base + ["--disaggregate", "--json"]).disaggregate == "on"
    assert p.parse_args(base + ["--disaggregate", "off"]).disaggregate == "off"
    with pytest.raises(SystemExit):
        p.parse_args(base + ["--disaggregate", "maybe"])


def test_cli_help_states_the_threshold():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    serve = sub.choices["serve"]
    assert f"{AUTO_MIN_GAIN:g}x" in serve.format_help().replace("\n", " ")


def test_header_modes_and_their_spot_check_defaults():
    assert params_from_header(pb.ServeUploadHeader(num_replicas=2)).disaggregate == "auto"
    auto = params_from_header(pb.ServeUploadHeader(num_replicas=2, disaggregate_mode="auto"))
    assert auto.verify_prob == DEFAULT_VERIFY_PROB  # auto never drops spot checks by itself
    legacy_on = params_from_header(pb.ServeUploadHeader(num_replicas=2, disaggregate=True))
    assert legacy_on.disaggregate == "on" and legacy_on.verify_prob == DEFAULT_VERIFY_PROB  # checks work disaggregated
    on_unchecked = params_from_header(pb.ServeUploadHeader(num_replicas=2, disaggregate_mode="on", verify_prob=0.0))
    assert on_unchecked.verify_prob == 0.0
    with pytest.raises(InvalidRequestError, match="--disaggregate must be one of"):
        params_from_header(pb.ServeUploadHeader(num_replicas=2, disaggregate_mode="sometimes"))


def test_auto_and_off_combine_with_any_options():
    ServeParams(num_replicas=1, routes=True, verify_prob=0.0, disaggregate="auto")
    ServeParams(num_replicas=1, verify_prob=0.05, disaggregate="off")
    ServeParams(num_replicas=2, verify_prob=0.05, disaggregate="on")  # spot checks ride on the prefill chains
    with pytest.raises(InvalidRequestError):
        ServeParams(num_replicas=1, verify_prob=0.0, disaggregate="on")


def test_rows_stored_before_the_modes_keep_their_behaviour():
    assert _params_from_json(json.dumps({"num_replicas": 2, "disaggregate": True, "verify_prob": 0})).disaggregate == "on"
    assert _params_from_json(json.dumps({"num_replicas": 2, "disaggregate": False})).disaggregate == "off"
    assert _params_from_json(json.dumps({"num_replicas": 2, "disaggregate": "auto"})).disaggregate == "auto"


def test_client_options_and_json_carry_the_mode():
    with pytest.raises(InvalidRequestError, match="auto, on or off"):
        ServeOptions(disaggregate=True)  # type: ignore[arg-type]  # the bool of before the modes
    rec = DisaggRecord(mode="auto", enabled=False, predicted_gain=1.04, reason="auto: not disaggregated: ...")
    out = rec.to_json()
    assert out["mode"] == "auto" and out["enabled"] is False and out["predicted_gain"] == 1.04
    assert out["reason"].startswith("auto: not disaggregated")


# ----------------------------------------------------------------------------- measured memory bandwidth
def test_measured_bandwidth_is_what_lets_auto_engage():
    """Compute-rich n0, n1 (8 TFLOPS) and compute-poor n2, n3 (2 TFLOPS): unmeasured, bandwidth is
    assumed to follow TFLOPS and no decode advantage appears; measured, with n2, n3 reading memory
    50x faster (the HexGen-2 case), decode moves there and auto engages."""
    nodes, mesh = devs([8.0, 8.0, 2.0, 2.0]), links(4)
    kw = dict(num_stages=1, workload=Workload(prompt_tokens=128, response_tokens=16, batch_sessions=4))
    unmeasured = plan_disaggregation(nodes, mesh, SHAPE, **kw)
    assert not unmeasured.enabled and unmeasured.predicted_gain < AUTO_MIN_GAIN
    assert "memory bandwidth not measured on 4 of 4 node(s)" in unmeasured.reason
    measured = plan_disaggregation(nodes, mesh, SHAPE, **kw,
                                   mem_bandwidth_Bps={"n0": 2e10, "n1": 2e10, "n2": 1e12, "n3": 1e12})
    assert measured.enabled and measured.predicted_gain >= AUTO_MIN_GAIN
    assert set(measured.prefill_nodes) == {"n0", "n1"} and set(measured.decode_nodes) == {"n2", "n3"}
    assert "not measured" not in measured.reason
    # bandwidth measured alike on every node: decode gains nothing from moving
    alike = plan_disaggregation(nodes, mesh, SHAPE, **kw, mem_bandwidth_Bps={f"n{i}": 1e11 for i in range(4)})
    assert not alike.enabled


def test_default_spot_checks_no_longer_block_auto():
    """Spot checks replay on the prefill chains, so the default --verify-prob 0.05 leaves auto free."""
    assert auto_blocker(routes=False, num_replicas=None) == ""
    assert decide_disaggregation("auto", blocker=auto_blocker(routes=False, num_replicas=2), predicted_gain=2.0).enabled


def test_nodes_of_one_device_model_are_pooled_to_their_medians():
    from swarm.scheduling.disaggregation import pool_alike

    nodes = devs([8.0, 2.0, 4.0, 1.0])
    models = {"n0": "cpu:x", "n1": "cpu:x", "n2": "cuda:y"}  # n3: no model known, left as measured
    seen, bw = pool_alike(nodes, {"n0": 1e11, "n1": 3e11, "n3": 5e10}, models)
    assert [d.node_id for d in seen] == ["n0", "n1", "n2", "n3"]
    assert [d.tflops for d in seen] == [5.0, 5.0, 4.0, 1.0]
    assert bw == {"n0": 2e11, "n1": 2e11, "n3": 5e10}  # n2 measured none: still unmeasured
    # the noisy HexGen-looking case on one device model predicts no gain once pooled
    seen, bw = pool_alike(devs([8.0, 8.0, 2.0, 2.0]), {"n0": 2e10, "n1": 2e10, "n2": 1e12, "n3": 1e12},
                          {f"n{i}": "cpu:x" for i in range(4)})
    assert not plan_disaggregation(seen, links(4), SHAPE, num_stages=1, mem_bandwidth_Bps=bw).enabled
