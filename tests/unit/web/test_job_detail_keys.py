"""The job JSON has one typed record (swarm/job_detail.py); the status page and /metrics read
only keys it defines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from swarm.job_detail import (
    JOB_DETAIL_KEYS, JOB_SUMMARY_KEYS, PROGRESS_KEYS, AssignmentDetail, JobDetail, ModelSummary, ProgressPoint,
)

WEB = Path(__file__).resolve().parents[3] / "coordinator" / "web"
GUESSED = ("tx_bytes", "rx_bytes", "num_steps", "max_steps", "last_loss", "current_step", "tokens_per_second",
           "sent_bytes", "saved_bytes", "compression_bytes_saved", "metrics_history")


def _detail_json() -> dict:
    point = {"step": 0, "attempt": 0, "loss": 5.0, "tokens": 512, "step_s": 0.5, "tokens_per_s": 1024.0,
             "bytes_sent": 10, "bytes_saved": 30, "bytes_raw": 40, "compute_s": 0.3, "wait_s": 0.1, "comm_s": 0.1,
             "at": 100.0}
    worker = {"stage": 0, "replica": 0, "step": 0, "bytes_sent": 10, "bytes_raw": 40, "compute_s": 0.3, "wait_s": 0.1,
              "comm_s": 0.1, "busy_s": 0.5, "bytes_forward": 10, "bytes_backward": None}
    return {
        "id": "feed01", "state": "running", "reason": "", "spec": {"name": "t", "compression": "none",
                                                                    "batch_size": 4, "seq_len": 8, "lr": 0.001},
        "model": {"family": "gpt2", "num_layers": 2, "hidden_size": 32, "num_parameters": 1000},
        "num_samples": 64, "dataset_key": "k", "total_steps": 10, "attempt": 0, "resume_step": 0,
        "step": 0, "loss": 5.0, "tokens_per_s": 1024.0, "bytes_sent": 10, "bytes_saved": 30, "eta_s": 4.5,
        "created_at": 1.0, "started_at": 2.0, "finished_at": None, "plan": {"d_pp": 1, "d_dp": 1, "stages": []},
        "assignments": [{"node_id": "ab" * 16, "node_name": "n", "stage": 0, "replica": 0, "layers": [0, 2],
                         "pipeline": 0, "share_index": 0, "share_count": 1}],
        "workers": [worker], "progress": [point],
        "checkpoints": [{"step": 0, "stage": 0, "replica": 0, "final": False}],
        "result_ready": False, "last_complete_checkpoint": None, "resumed_from": None,
        "events": [{"seq": 1, "at": 1.0, "kind": "submitted", "message": "submitted: 10 steps",
                    "fields": {"total_steps": 10}}],
        "repeated_steps": [], "rolled_back_steps": [],
        "spot_checks": {"checks": 4, "weighed": 3, "unverifiable": 1, "mismatches": 0},
    }


def test_detail_round_trips_with_every_key_and_value_in_order() -> None:
    d = _detail_json()
    record = JobDetail.from_json(d)
    assert isinstance(record.model, ModelSummary) and isinstance(record.assignments[0], AssignmentDetail)
    assert isinstance(record.progress[0], ProgressPoint)
    assert record.to_json() == d and list(record.to_json()) == list(d)
    assert list(record.to_json()["progress"][0]) == list(d["progress"][0])


def test_an_assignment_from_a_coordinator_older_than_helpers_reads_as_its_own_pipeline() -> None:
    d = _detail_json()
    d["assignments"] = [{"node_id": "ab" * 16, "node_name": "n", "stage": 0, "replica": 1, "layers": [0, 2]}]
    a = JobDetail.from_json(d).assignments[0]
    assert (a.pipeline, a.share_index, a.share_count) == (1, 0, 1)


def test_summary_is_what_api_jobs_lists() -> None:
    s = JobDetail.from_json(_detail_json()).summary_json()
    assert set(s) == JOB_SUMMARY_KEYS
    assert s["spec"] == {"name": "t", "compression": "none", "batch_size": 4, "seq_len": 8, "lr": 0.001}
    assert (s["d_pp"], s["d_dp"]) == (1, 1)


@pytest.mark.parametrize("change", ["missing", "extra", "nested"])
def test_a_record_with_other_keys_is_refused(change: str) -> None:
    d = _detail_json()
    if change == "missing":
        del d["loss"]
    elif change == "extra":
        d["last_loss"] = 1.0
    else:
        d["progress"][0]["tokens_per_second"] = 1.0
    with pytest.raises(ValueError):
        JobDetail.from_json(d)


def test_metrics_read_only_job_detail_keys() -> None:
    text = (WEB / "metrics.py").read_text()
    keys = set(re.findall(r'job_value\(job, "([a-z_]+)"\)', text))
    assert keys and keys <= JOB_DETAIL_KEYS, keys - JOB_DETAIL_KEYS


def test_status_page_reads_only_job_record_keys() -> None:
    text = (WEB / "static" / "app.js").read_text()
    keys = set(re.findall(r'jobKey\([a-z]+, "([a-z_]+)"\)', text))
    assert {"step", "total_steps", "loss", "tokens_per_s", "bytes_saved", "progress", "step_s"} <= keys
    assert keys <= JOB_DETAIL_KEYS | JOB_SUMMARY_KEYS | PROGRESS_KEYS, keys - (JOB_DETAIL_KEYS | PROGRESS_KEYS)


@pytest.mark.parametrize("name", ["metrics.py", "static/app.js"])
def test_no_guessed_key_names(name: str) -> None:
    text = (WEB / name).read_text()
    assert [g for g in GUESSED if f'"{g}"' in text] == []
