"""Shared pieces of the training multi-process tests: a tiny model, data, the reference."""

from __future__ import annotations

from pathlib import Path

import torch

from swarm.compression import CodecSpec
from swarm.model.checkpoint import load_checkpoint
from swarm.pipeline.codecs import simulated_boundary, state_key
from swarm.pipeline.data import BatchOrder, TokenDataset
from swarm.pipeline.optim import OptimConfig
from swarm.pipeline.reference import train_reference

TEXT = (
    "The swarm pools volunteer graphics cards to train language models together.\n"
    "Each node holds a few layers and sends activations to the next node.\n"
    "A quick brown fox jumps over the lazy dog, again and again.\n"
)


def write_inputs(root: Path) -> tuple[Path, Path]:
    from swarm.model.testing import make_tiny_checkpoint

    make_tiny_checkpoint(root / "model", num_layers=3, hidden_size=32, num_heads=4, max_position_embeddings=64)
    data = root / "data.txt"
    data.write_text(TEXT * 4)  # ~25 windows of 16 tokens: 10 steps of 4 make 1.6 epochs
    return root / "model", data


def train_args(coord, model: Path, data: Path, *, steps: int, codec: str = "none", stages: int = 3, replicas: int = 1,
               extra: tuple[str, ...] = ()) -> list[str]:
    return ["train", "--coordinator", coord.address, "--token", coord.admin_token, "--model", str(model), "--data", str(data), "--steps", str(steps),
            "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "16", "--lr", "3e-3", "--compression", codec,
            "--stages", str(stages), "--replicas", str(replicas), "--peer-timeout-s", "15", *extra]


def reference_losses(coord_dir: Path, job: dict) -> tuple[list[float], list]:
    """Train the job's prepared model on its data in this process, as the swarm should have."""
    jdir = coord_dir / "jobs" / job["id"]
    ckpt = load_checkpoint(jdir / "init")
    dataset = TokenDataset.load(jdir / "data.npy")
    spec = job["spec"]
    replicas = job["plan"]["d_dp"]
    ranges = [tuple(s["layers"]) for s in job["plan"]["stages"]]
    order = BatchOrder(num_samples=dataset.num_samples, batch_size=spec["batch_size"],
                       micro_batch_size=spec["micro_batch_size"], num_replicas=replicas, seed=spec["seed"])
    optim = OptimConfig(lr=spec["lr"], weight_decay=spec["weight_decay"], warmup_steps=spec["warmup_steps"],
                        total_steps=job["total_steps"], min_lr_ratio=spec["min_lr_ratio"], grad_clip=spec["grad_clip"])
    key = state_key(job["id"], dataset.key)
    boundaries = [
        [simulated_boundary(CodecSpec.parse(spec["compression"]), boundary=k, key=key, num_samples=dataset.num_samples,
                            row_shape=(spec["seq_len"], ckpt.config.hidden_size)) for k in range(len(ranges) - 1)]
        for _ in range(replicas)
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the nodes run with one thread: same reduction order, same floats
    try:
        return train_reference(config=ckpt.config, tensors=ckpt.tensors, dataset=dataset, order=order, optim=optim,
                               ranges=ranges, steps=job["total_steps"], boundaries=boundaries)
    finally:
        torch.set_num_threads(threads)
