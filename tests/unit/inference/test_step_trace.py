"""The step trace (swarm/steptrace.py): records written per process, joined per step into hops."""

import pytest

from swarm.steptrace import StepTrace, hop_breakdown, read_traces

pytestmark = pytest.mark.timeout(30)


def _chain_records(t0: float) -> list[dict]:
    """One decode step through a 2-stage chain, times in seconds from t0."""
    coord = {"role": "coordinator", "key": ["s", 5], "stage": -1, "send": t0, "reply": t0 + 0.010}
    s0 = {"role": "node", "key": ["s", 5], "stage": 0, "in": t0 + 0.001, "parsed": t0 + 0.0011,
          "computed": t0 + 0.003, "packed": t0 + 0.0032, "back": t0 + 0.0085, "out": t0 + 0.0086}
    s1 = {"role": "node", "key": ["s", 5], "stage": 1, "in": t0 + 0.004, "parsed": t0 + 0.0043,
          "computed": t0 + 0.007, "out": t0 + 0.0075}
    return [coord, s0, s1]


def test_hop_breakdown_splits_a_round_trip_into_its_segments():
    seg = hop_breakdown(_chain_records(100.0), num_stages=2)
    ms = {k: round(v[0], 3) for k, v in seg.items()}
    assert ms["coord->s0"] == 1.0
    assert ms["s0 compute"] == 1.9
    assert ms["s0->s1"] == 0.8
    assert ms["s1->s0"] == 1.0
    assert ms["s0->coord"] == 1.4
    assert ms["total"] == 10.0
    # the segments tile the round trip exactly
    parts = ["coord->s0", "s0 parse", "s0 compute", "s0 pack", "s0->s1", "s1 parse", "s1 compute", "s1 sample",
             "s1->s0", "s0 reply", "s0->coord"]
    assert sum(seg[p][0] for p in parts) == pytest.approx(seg["total"][0])


def test_a_step_missing_from_one_process_is_left_out():
    records = _chain_records(0.0)[:2]  # stage 1 never wrote its record
    assert hop_breakdown(records, num_stages=2) == {}


def test_trace_files_round_trip_and_an_unwritable_directory_turns_tracing_off(tmp_path):
    t = StepTrace("node", directory=str(tmp_path))
    t.write(("abc", 3), 1, {"in": 1.0, "out": 2.0}, model="m", entries=2)
    (rec,) = read_traces(tmp_path)
    assert rec["role"] == "node" and rec["key"] == ["abc", 3] and rec["model"] == "m" and rec["entries"] == 2
    blocked = tmp_path / "file"
    blocked.write_text("")
    off = StepTrace("node", directory=str(blocked / "sub"))  # a file where the directory should be
    assert not off.enabled
    off.write(("x", 1), 0, {}, model="m", entries=1)  # a no-op, no error
    assert StepTrace("node", directory="").enabled is False
