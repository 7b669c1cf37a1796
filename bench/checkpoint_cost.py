"""What one stage checkpoint costs: the part training waits for and the background part.

    python -m bench.checkpoint_cost [--repeats 5] [--no-record]

For a stage of a few model sizes (after one AdamW step, so the moments exist), measures what
node/training/worker.py and node/training/checkpoints.py do per checkpoint:

- ``blocking_ms``: the snapshot the training thread takes (weights and AdamW state copied to CPU,
  ``snapshot_tensors``); training waits for this and nothing else;
- ``write_ms``: the background thread's ``save_file`` of both files (the node's own copy);
- ``hash_ms``: SHA-256 of both files (done once by the upload's transfer, once by the keeper's
  fetch, once by the coordinator's record: coordinator/jobs/keepers.py);
- ``bytes``: the two files, what goes to the coordinator and again to the checkpoint keeper.

The median of ``--repeats`` runs. Prints a table and appends it to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench._record import markdown_table, record
from node.training.checkpoints import snapshot_tensors
from swarm.model.config import ModelConfig
from swarm.model.stage import StageModel
from swarm.pipeline.optim import OptimConfig, make_optimizer
from swarm.pipeline.optim_state import stage_optimizer_state
from swarm.transport.transfer import sha256_file

# (name, hidden, layers of the stage, vocab): the tiny model of the tests and bench/chaos.py, and
# a GPT-2-small-sized middle stage (4 of its 12 layers)
SIZES = [("tiny 6x64, stage of 2 layers", 64, 2, 384), ("gpt2-small, stage of 4 layers", 768, 4, 50257)]


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(hidden: int, layers: int, vocab: int, *, repeats: int) -> dict:
    config = ModelConfig(family="gpt2", vocab_size=vocab, hidden_size=hidden, num_layers=layers + 2,
                         num_heads=max(1, hidden // 64), max_position_embeddings=128)
    module = StageModel(config, 1, 1 + layers, is_first=False, is_last=False)  # a middle stage
    opt = make_optimizer(module.parameters(), OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=0, total_steps=10))
    x = torch.randn(1, 8, hidden)
    module(x).sum().backward()
    opt.step()

    snap = {}

    def snapshot() -> None:
        snap["w"] = snapshot_tensors(module.hf_state_dict())
        snap["o"] = snapshot_tensors(stage_optimizer_state(module, opt))

    blocking = _median_ms(snapshot, repeats)
    with tempfile.TemporaryDirectory() as tmp:
        w, o = Path(tmp) / "weights.safetensors", Path(tmp) / "optimizer.safetensors"
        write = _median_ms(lambda: (save_file(snap["w"], str(w)), save_file(snap["o"], str(o))), repeats)
        hashing = _median_ms(lambda: (sha256_file(w), sha256_file(o)), repeats)
        size = w.stat().st_size + o.stat().st_size
    return {"params": sum(p.numel() for p in module.parameters()), "blocking_ms": blocking, "write_ms": write,
            "hash_ms": hashing, "bytes": size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for name, hidden, layers, vocab in SIZES:
        m = measure(hidden, layers, vocab, repeats=args.repeats)
        rows.append([name, f"{m['params'] / 1e6:.2f} M", f"{m['bytes'] / 2**20:.1f} MiB", f"{m['blocking_ms']:.1f}",
                     f"{m['write_ms']:.1f}", f"{m['hash_ms']:.1f}"])
    table = markdown_table(["stage", "parameters", "checkpoint (weights + AdamW)", "training waits (ms)",
                            "background write (ms)", "SHA-256 of both (ms)"], rows)
    notes = (f"Median of {args.repeats}. Training waits only for the CPU snapshot; the write, the upload to "
             "the coordinator and the keeper's copy (node/training/kept.py) run in the background.")
    print(table)
    print(notes)
    if not args.no_record:
        record("Checkpoint cost per stage (bench/checkpoint_cost.py)", table, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
