"""Asynchronous stage checkpoints: training snapshots tensors to CPU, a background thread writes
them to the node's state dir and uploads a copy to the coordinator.

Protocol with the worker: :meth:`CheckpointWriter.submit` takes a snapshot (CPU tensors the
training thread no longer touches) and returns at once; checkpoints are written and uploaded in
order; :meth:`wait` blocks until everything submitted is done (the final checkpoint, a fence).
An upload that fails because the coordinator is unreachable or restarting is retried with
backoff for up to ``outage_s``; a checkpoint that still could not be uploaded stays on disk and
the error is kept in ``last_error`` (training is never failed by it, except that :meth:`wait`
raises it, for the final checkpoint and fences that need the coordinator's copy).
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from swarm.errors import PeerError, SwarmError
from swarm.proto.v1 import training_pb2 as pb

from node.training.membership import DEFAULT_OUTAGE_S, is_outage

log = logging.getLogger(__name__)
KEEP_LOCAL_CHECKPOINTS = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    step: int
    final: bool
    weights: dict[str, torch.Tensor]  # HF names -> CPU tensors (copies)
    optimizer: dict[str, torch.Tensor]  # swarm/pipeline/optim_state.py keys -> CPU tensors (copies)
    meta: dict[str, Any]
    upload_weights: bool  # False: only meta.json (another replica uploads the tensors)


def snapshot_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies that later in-place updates of the originals do not change."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


class CheckpointWriter:
    def __init__(self, client, assignment, directory: Path, *, outage_s: float = DEFAULT_OUTAGE_S,
                 stop: threading.Event | None = None) -> None:
        self.client = client
        self.a = assignment
        self.dir = Path(directory)
        self.outage_s = outage_s
        self._stop = stop or threading.Event()
        self.last_error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="checkpoints", daemon=True)
        self._thread.start()

    def submit(self, snap: Snapshot) -> None:
        self._queue.put(snap)

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until every submitted checkpoint is written and uploaded; raises the last
        upload error (PeerError when it did not finish within the timeout)."""
        deadline = time.monotonic() + (self.outage_s + 60 if timeout_s is None else timeout_s)
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                raise PeerError("the checkpoint upload did not finish in time")
            time.sleep(0.01)
        if self.last_error is not None:
            raise self.last_error

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            snap = self._queue.get()
            try:
                if snap is None:
                    return
                self._write_and_upload(snap)
            except Exception as exc:  # noqa: BLE001 -- kept for wait(); training goes on
                self.last_error = exc
                log.warning("checkpoint of step %d not uploaded: %s", getattr(snap, "step", -1), exc)
            finally:
                self._queue.task_done()

    def _write_and_upload(self, snap: Snapshot) -> None:
        a = self.a
        d = self.dir / f"step-{snap.step:08d}"
        d.mkdir(parents=True, exist_ok=True)
        weights, optim, meta = d / "weights.safetensors", d / "optimizer.safetensors", d / "meta.json"
        save_file(snap.weights, str(weights))
        save_file(snap.optimizer, str(optim))
        meta.write_text(json.dumps(snap.meta))
        upload = [weights, optim, meta] if snap.upload_weights else [meta]
        header = pb.CheckpointHeader(job_id=a.job_id, stage=a.stage, replica=a.replica, step=snap.step,
                                     final=snap.final, attempt=a.attempt)
        deadline = time.monotonic() + self.outage_s
        backoff = 0.2
        while True:
            try:
                self.client.upload_checkpoint(header, upload)
                break
            except SwarmError as exc:
                if not is_outage(exc) or time.monotonic() + backoff > deadline or self._stop.is_set():
                    raise
                log.debug("coordinator unreachable, checkpoint of step %d kept for later: %s", snap.step, exc)
                self._stop.wait(backoff)
                backoff = min(2.0, backoff * 2)
        self.last_error = None
        old = sorted(p for p in self.dir.glob("step-*") if p.is_dir())
        for p in old[:-KEEP_LOCAL_CHECKPOINTS]:
            shutil.rmtree(p, ignore_errors=True)
        log.info("checkpoint job=%s stage=%d replica=%d step=%d final=%s", a.job_id, a.stage, a.replica, snap.step,
                 snap.final)
