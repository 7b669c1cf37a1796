"""The swarm bench/chaos.py runs its jobs on (and bench/averaging.py, bench/verification.py): a
coordinator and node processes on this machine that can be SIGKILLed and started again on the same
state dirs (and, for the coordinator, the same ports); the tiny GPT-2 and stdlib text it trains
on; submitting the job; calibrating its length; the held-out loss of a result.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from pathlib import Path

import torch

from swarm.localswarm import start_coordinator, start_node, wait_until

# A node silent for 6 s is lost: with 3 s, a 2-core machine loaded by other work (load 8) had every
# node of a job declared lost at once, and the job rolled back.
FAST_COORDINATOR = ["--heartbeat-interval-s", "0.5", "--node-timeout-s", "6", "--log-level", "INFO"]
CALIBRATE_S = 40.0  # the calibration job's length (its first 10 s, model set-up, not counted)
NODE_ARGS = ["--probe-seconds", "0.1", "--log-level", "INFO"]


class Swarm:
    def __init__(self, root: Path, num_nodes: int) -> None:
        self.root = root
        self.coord, ready = start_coordinator(root / "coord", extra_args=FAST_COORDINATOR)
        self.port, self.http_port, self.token = int(ready["port"]), int(ready["http_port"]), ready["token"]
        self.admin_token = ready["admin_token"]  # the join token (self.token) is for nodes only
        self.nodes = {}
        for i in range(num_nodes):
            self.nodes[i] = self._start_node(i)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start_node(self, i: int, *, wait_for: str = "READY"):
        return start_node(self.address, self.token, self.root / f"n{i}", name=f"n{i}", extra_args=NODE_ARGS,
                          wait_for=wait_for)[0]

    def get(self, path: str):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}",
                                     headers={"Authorization": f"Bearer {self.admin_token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def kill_node(self, i: int) -> None:
        self.nodes[i].kill()

    def restart_node(self, i: int) -> None:
        self.nodes[i].stop()
        # not waiting for READY: the coordinator may be down now (the node registers when it is back)
        self.nodes[i] = self._start_node(i, wait_for="STARTED")

    def kill_coordinator(self) -> None:
        self.coord.kill()

    def restart_coordinator(self) -> None:
        self.coord.stop()
        self.coord, _ = start_coordinator(self.root / "coord", port=self.port, http_port=self.http_port,
                                          extra_args=FAST_COORDINATOR)

    def stop(self) -> None:
        for p in self.nodes.values():
            p.stop()
        self.coord.stop()


def inputs(root: Path, *, train_bytes: int) -> tuple[Path, Path, str]:
    from bench.convergence import load_corpus
    from swarm.model.testing import make_tiny_checkpoint

    text, _ = load_corpus("stdlib")
    text = text.decode("utf-8", "replace")
    make_tiny_checkpoint(root / "model", num_layers=6, hidden_size=64, num_heads=4, max_position_embeddings=128,
                         with_tokenizer=False)
    (root / "data.txt").write_text(text[:train_bytes])
    return root / "model", root / "data.txt", text[train_bytes:train_bytes + 20_000]  # held out: never trained on


def submit(swarm: Swarm, model: Path, data: Path, args, *, steps: int | None = None) -> str:
    from swarm.cli.train import upload_files
    from swarm.compression import CodecSpec
    from swarm.job_spec import JobSpec
    from swarm.transport.coordinator_client import CoordinatorClient

    spec = JobSpec(steps=steps or args.steps, batch_size=8, micro_batch_size=2, seq_len=64, lr=2e-3,
                   codec=CodecSpec.parse("none"), checkpoint_every=args.checkpoint_every, num_stages=args.stages,
                   num_replicas=args.replicas, peer_timeout_s=20.0, warmup_steps=10, seed=1)
    with CoordinatorClient(swarm.address, token=swarm.admin_token) as client:
        return client.submit_job(spec, upload_files(model, data)).id


def calibrate(swarm: Swarm, model: Path, data: Path, args) -> float:
    """Fault-free steps/s of the job, from a long job run for :data:`CALIBRATE_S`, then cancelled:
    one over the median time of its steps (:func:`steps_per_s`)."""
    from swarm.transport.coordinator_client import CoordinatorClient

    job_id = submit(swarm, model, data, args, steps=1_000_000)
    wait_until(lambda: (swarm.get(f"/api/jobs/{job_id}")["step"] or 0) >= 3, 120, message="calibration job trains")
    time.sleep(CALIBRATE_S - 10)
    progress = swarm.get(f"/api/jobs/{job_id}")["progress"]
    with CoordinatorClient(swarm.address, token=swarm.admin_token) as client:
        client.cancel_job(job_id, "calibration done")
    wait_until(lambda: swarm.get(f"/api/jobs/{job_id}")["state"] == "cancelled", 60, message="calibration ends")
    return steps_per_s(progress)


def steps_per_s(progress: list[dict]) -> float:
    """One over the median step time of a job's committed steps (their first 3, set-up, not
    counted). Not steps over the window's time: a single 10 s averaging stall (hivemind's
    matchmaking on a loaded box, swarm/pipeline/averaging.py) in a 30 s window of ~0.7 s steps
    halved that rate, and the job was sized to half the time it then took."""
    times = [p["step_s"] for p in progress[3:] if p.get("step_s")]
    if len(times) < 5:
        raise RuntimeError(f"the calibration job committed only {len(times)} timed steps in {CALIBRATE_S:.0f} s: "
                           "the machine is too loaded to size the job; give --steps instead")
    return 1.0 / statistics.median(times)


def heldout_loss(result_dir: Path, text: str, seq_len: int = 64, windows: int = 64) -> float:
    from swarm.model.checkpoint import load_checkpoint
    from swarm.model.stage import StageModel
    from swarm.model.tokenizer import load_tokenizer

    ckpt = load_checkpoint(result_dir)
    model = StageModel(ckpt.config, 0, ckpt.config.num_layers, is_first=True, is_last=True)
    model.load_hf_state(ckpt.tensors)
    ids = torch.tensor(load_tokenizer(result_dir).encode(text)[: windows * (seq_len + 1)]).view(-1, seq_len + 1)
    with torch.no_grad():
        logits = model(ids[:, :-1])
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                       ids[:, 1:].reshape(-1)))
