"""Validation of values that arrive from the network."""

import dataclasses
import math

import pytest

from coordinator.servicer import check_protocol_version
from swarm.errors import ConfigError, InvalidRequestError, VersionMismatchError
from swarm.hardware import HardwareInfo
from swarm.transport.channels import parse_address
from swarm.transport.convert import MAX_METRICS_JSON_BYTES, hardware_from_proto, hardware_to_proto, metrics_from_json

HW = HardwareInfo(device="cuda:0", device_kind="cuda", device_name="gpu", memory_bytes=80 << 30,
                  memory_free_bytes=70 << 30, compute_capability="9.0", cpu_cores=16, ram_bytes=128 << 30,
                  disk_free_bytes=1 << 40, tflops=700.0, tflops_dtype="bfloat16")


def test_hardware_roundtrip():
    assert hardware_from_proto(hardware_to_proto(HW)) == HW


@pytest.mark.parametrize("change", [
    {"tflops": math.nan}, {"tflops": -1.0}, {"tflops": 1e9}, {"memory_bytes": -5},
    {"memory_free_bytes": 100 << 30}, {"cpu_cores": 0}, {"device_kind": "tpu"}, {"device": "cpu"},
    {"tflops_dtype": "int8"}, {"device_name": "x" * 500},
])
def test_bad_hardware_is_invalid_request(change):
    msg = hardware_to_proto(HW)
    fields = {"device": "device", "device_kind": "device_kind"}
    for k, v in change.items():
        setattr(msg, fields.get(k, k), v)
    with pytest.raises(InvalidRequestError):
        hardware_from_proto(msg)


def test_hardware_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        HW.tflops = 1.0  # type: ignore[misc]


def test_metrics_json():
    assert metrics_from_json("") == {}
    assert metrics_from_json('{"stage": 1, "loss": 2.5}') == {"stage": 1, "loss": 2.5}
    for bad in ("[1]", "{", '{"a": NaN}', '{"a": Infinity}', "x" * (MAX_METRICS_JSON_BYTES + 1), "[" * 100_000):
        with pytest.raises(InvalidRequestError):
            metrics_from_json(bad)


def test_parse_address():
    assert parse_address("10.0.0.1:7000") == ("10.0.0.1", 7000)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("nohost", ":80", "h:0", "h:70000", "h:port", "a b:1", "x" * 400):
        with pytest.raises(ConfigError):
            parse_address(bad)


def test_protocol_version():
    check_protocol_version("1.0")
    check_protocol_version("1.7")
    with pytest.raises(VersionMismatchError, match="upgrade"):
        check_protocol_version("2.0")
    with pytest.raises(VersionMismatchError):
        check_protocol_version("")
