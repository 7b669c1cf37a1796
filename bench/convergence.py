"""Convergence of fine-tuning through compressed pipeline boundaries (AQ-SGD vs direct vs none).

Pre-trains a small byte-level GPT on a real offline corpus that every machine with the test
dependencies has (by default the running Python's standard library source: its top-level
``*.py`` files in name order; the table records the Python version and the corpus's SHA-256, so
a rerun on the same Python reads the same bytes), then fine-tunes copies of it for several epochs on a
held-out slice, split into stages joined by simulated compressed links
(:class:`swarm.compression.CompressedBoundary`), once per codec. Prints per-epoch training loss,
final validation loss, activation/gradient relative error and bytes per link; ``--json`` prints
one object keyed by codec spec.

    python -m bench.convergence --quick            # ~3-5 min on 2 CPU cores
    python -m bench.convergence --size gpt2-small  # GPU: GPT-2-small shape (12 x 768)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F

from bench._record import markdown_table, record
from swarm.compression import CompressedBoundary, CodecSpec, boundary_seed, dataset_key
from swarm.model import ModelConfig, StageModel, build_stage

DEFAULT_CODECS = (
    "none",
    "direct:fw=2,bw=4",
    "direct:fw=4,bw=8",
    "aqsgd:fw=2,bw=4",
    "aqsgd:fw=3,bw=6",
    "aqsgd:fw=4,bw=8",
)
FORTUNES = Path("/usr/share/games/fortunes")


@dataclass(frozen=True, slots=True, kw_only=True)
class Size:
    hidden: int
    layers: int
    heads: int
    seq_len: int
    stages: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    finetune_samples: int
    finetune_batch: int
    finetune_lr: float
    epochs: int
    val_samples: int


SIZES = {
    # ~1 M parameters, 4 stages of one layer: fits the 10-minute budget on 2 shared cores
    "quick": Size(hidden=128, layers=4, heads=4, seq_len=64, stages=4, pretrain_steps=300, pretrain_batch=32,
                  pretrain_lr=3e-3, finetune_samples=256, finetune_batch=16, finetune_lr=3e-4, epochs=10,
                  val_samples=64),
    "default": Size(hidden=192, layers=6, heads=6, seq_len=128, stages=3, pretrain_steps=600, pretrain_batch=32,
                    pretrain_lr=2e-3, finetune_samples=512, finetune_batch=16, finetune_lr=6e-4, epochs=8,
                    val_samples=128),
    # GPT-2-small shape (12 layers x 768, 12 heads; byte vocabulary), 4 stages: for a GPU
    "gpt2-small": Size(hidden=768, layers=12, heads=12, seq_len=256, stages=4, pretrain_steps=800, pretrain_batch=32,
                       pretrain_lr=6e-4, finetune_samples=512, finetune_batch=16, finetune_lr=3e-5, epochs=6,
                       val_samples=128),
}


def load_corpus(name: str) -> tuple[bytes, str]:
    """(text bytes, description) of an offline corpus: stdlib (the default), fortunes, or a
    file/dir path. The description names the source and ends with the bytes' SHA-256 prefix."""
    text, desc = _read_corpus(name)
    if not text:
        raise SystemExit(f"corpus {name!r} is empty; use --corpus stdlib")
    return text, f"{desc}, sha256 {hashlib.sha256(text).hexdigest()[:16]}"


def _read_corpus(name: str) -> tuple[bytes, str]:
    if name == "fortunes":
        files = sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))
        if not files:
            raise SystemExit("no fortunes found: apt-get install -y fortunes, or use --corpus stdlib")
        return b"".join(p.read_bytes() for p in files), f"fortunes ({len(files)} files)"
    if name == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*.py") if p.is_file())
        version = ".".join(map(str, sys.version_info[:3]))
        return b"".join(p.read_bytes() for p in files), f"Python {version} stdlib *.py ({len(files)} files)"
    p = Path(name)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    return b"".join(f.read_bytes() for f in files), str(p)


def make_blocks(data: np.ndarray, seq_len: int, count: int) -> torch.Tensor:
    """``count`` consecutive non-overlapping blocks of seq_len + 1 bytes (inputs and targets)."""
    n = min(count, (len(data) - 1) // (seq_len + 1))
    blocks = data[: n * (seq_len + 1)].reshape(n, seq_len + 1)
    return torch.from_numpy(blocks.astype(np.int64))


def split_stages(model_state: dict[str, torch.Tensor], config: ModelConfig, num_stages: int, device) -> list[StageModel]:
    per = config.num_layers // num_stages
    bounds = [i * per for i in range(num_stages)] + [config.num_layers]
    stages = []
    for i in range(num_stages):
        s = StageModel(config, bounds[i], bounds[i + 1], is_first=i == 0, is_last=i == num_stages - 1)
        s.load_hf_state(model_state)
        stages.append(s.to(device))
    return stages


def pipeline_forward(stages, boundaries, x, ids):
    h = x
    for i, stage in enumerate(stages):
        h = stage(h)
        if i < len(boundaries):
            h = boundaries[i](h, ids)
    return h


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def pretrain(config: ModelConfig, size: Size, data: np.ndarray, device, seed: int, log) -> dict[str, torch.Tensor]:
    model = build_stage(config, 0, config.num_layers, seed=seed, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=size.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for step in range(size.pretrain_steps):
        lr = size.pretrain_lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / size.pretrain_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = gen.integers(0, len(data) - size.seq_len - 1, size=size.pretrain_batch)
        batch = torch.from_numpy(np.stack([data[s: s + size.seq_len + 1] for s in starts]).astype(np.int64)).to(device)
        loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == size.pretrain_steps - 1:
            log(f"pretrain step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)")
    return {k: v.detach().clone() for k, v in model.hf_state_dict().items()}


def finetune(spec: str, state, config: ModelConfig, size: Size, train: torch.Tensor, val: torch.Tensor, device, seed: int, key: str, log):
    torch.manual_seed(seed)
    stages = split_stages(state, config, size.stages, device)
    codec = CodecSpec.parse(spec)
    boundaries = [
        CompressedBoundary(codec, key=key, num_samples=len(train), row_shape=(size.seq_len, config.hidden_size),
                           device=device, seed=boundary_seed(codec, i))
        for i in range(size.stages - 1)
    ]
    params = [p for s in stages for p in s.parameters()]
    opt = torch.optim.AdamW(params, lr=size.finetune_lr, betas=(0.9, 0.95), weight_decay=0.0)
    order_gen = torch.Generator().manual_seed(seed)
    epoch_losses = []
    per_epoch_stats = []
    t0 = time.perf_counter()
    for epoch in range(size.epochs):
        for b in boundaries:
            b.stats.reset()
        perm = torch.randperm(len(train), generator=order_gen)
        losses = []
        for i in range(0, len(train) - size.finetune_batch + 1, size.finetune_batch):
            ids = perm[i: i + size.finetune_batch]
            batch = train[ids].to(device)
            logits = pipeline_forward(stages, boundaries, batch[:, :-1], ids)
            loss = lm_loss(logits, batch[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
        epoch_losses.append(float(np.mean(losses)))
        per_epoch_stats.append({
            "forward_bytes": sum(b.stats.forward_bytes for b in boundaries),
            "backward_bytes": sum(b.stats.backward_bytes for b in boundaries),
            "act_rel_error": float(np.mean([b.stats.act_rel_error for b in boundaries])),
            "grad_rel_error": float(np.mean([b.stats.grad_rel_error for b in boundaries])),
        })
        log(f"  {spec} epoch {epoch} loss {epoch_losses[-1]:.4f} act_err {per_epoch_stats[-1]['act_rel_error']:.4f} "
            f"grad_err {per_epoch_stats[-1]['grad_rel_error']:.4f} ({time.perf_counter() - t0:.0f}s)")
    with torch.no_grad():  # validation of the trained weights, without compression
        vl = []
        for i in range(0, len(val), size.finetune_batch):
            batch = val[i: i + size.finetune_batch].to(device)
            vl.append(lm_loss(pipeline_forward(stages, [], batch[:, :-1], None), batch[:, 1:]).item() * len(batch))
        val_loss = float(np.sum(vl) / len(val))
    n_links = max(1, len(boundaries))
    fw = sum(s["forward_bytes"] for s in per_epoch_stats)
    bw = sum(s["backward_bytes"] for s in per_epoch_stats)
    later = per_epoch_stats[1:] or per_epoch_stats  # epoch 0 of aqsgd is uncompressed
    return {
        "spec": spec,
        "epoch_train_loss": epoch_losses,
        "final_train_loss": epoch_losses[-1],
        "val_loss": val_loss,
        "bytes_per_link": (fw + bw) / n_links,
        "forward_bytes_per_link": fw / n_links,
        "backward_bytes_per_link": bw / n_links,
        "act_rel_error": float(np.mean([s["act_rel_error"] for s in later])),
        "grad_rel_error": float(np.mean([s["grad_rel_error"] for s in later])),
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small preset (same as --size quick)")
    ap.add_argument("--size", choices=sorted(SIZES), default=None)
    ap.add_argument("--json", action="store_true", help="print one JSON object keyed by codec spec")
    ap.add_argument("--codecs", default=";".join(DEFAULT_CODECS), help="semicolon-separated codec specs")
    ap.add_argument("--corpus", default="stdlib",
                    help="stdlib (default: this Python's standard library source, on every machine) | fortunes "
                         "(Debian's package) | a file or directory")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core machine more threads only oversubscribe)")
    ap.add_argument("--pretrained-cache", default=None, help="reuse/save the pre-trained weights at this .pt path")
    ap.add_argument("--no-record", action="store_true", help="do not append to docs/benchmarks.md")
    ap.add_argument("--record-to", default=None, help="append the section to this markdown file instead")
    args = ap.parse_args(argv)
    size_name = args.size or ("quick" if args.quick or not torch.cuda.is_available() else "gpt2-small")
    size = SIZES[size_name]
    if args.epochs or args.lr:
        size = Size(**{**{f: getattr(size, f) for f in size.__slots__},
                       "epochs": args.epochs or size.epochs, "finetune_lr": args.lr or size.finetune_lr})
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    codecs = [c.strip() for c in args.codecs.split(";") if c.strip()]
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))

    text, corpus_desc = load_corpus(args.corpus)
    data = np.frombuffer(text, dtype=np.uint8)
    n = len(data)
    pre, fine = data[: int(n * 0.85)], data[int(n * 0.85):]
    train = make_blocks(fine, size.seq_len, size.finetune_samples)
    val = make_blocks(fine[train.numel():], size.seq_len, size.val_samples)
    config = ModelConfig(family="gpt2", vocab_size=256, hidden_size=size.hidden, num_layers=size.layers,
                         num_heads=size.heads, max_position_embeddings=size.seq_len, tie_word_embeddings=False)
    log(f"corpus {corpus_desc}: {n} bytes; model {size_name} {config.num_parameters() / 1e6:.2f}M params, "
        f"{size.stages} stages; fine-tune {len(train)} x {size.seq_len} tokens for {size.epochs} epochs on {args.device}")
    t0 = time.perf_counter()
    cache = Path(args.pretrained_cache) if args.pretrained_cache else None
    if cache is not None and cache.is_file():
        state = {k: v.to(args.device) for k, v in torch.load(cache).items()}
        log(f"pre-trained weights from {cache}")
    else:
        state = pretrain(config, size, pre, args.device, args.seed, log)
        if cache is not None:
            torch.save({k: v.cpu() for k, v in state.items()}, cache)
    key = dataset_key("bench-convergence", [train])
    results = {}
    for spec in codecs:
        results[spec] = finetune(spec, state, config, size, train, val, args.device, args.seed, key, log)
    total_s = time.perf_counter() - t0

    base = results.get("none")
    headers = ["codec", *[f"ep{i}" for i in range(size.epochs)], "final train", "vs none", "val", "act rel err",
               "grad rel err", "MB/link"]
    rows = []
    for spec, r in results.items():
        delta = r["final_train_loss"] - base["final_train_loss"] if base else float("nan")
        r["delta_vs_none"] = delta
        rows.append([spec, *[round(x, 4) for x in r["epoch_train_loss"]], round(r["final_train_loss"], 4),
                     f"{delta:+.4f}", round(r["val_loss"], 4), round(r["act_rel_error"], 4),
                     round(r["grad_rel_error"], 4), round(r["bytes_per_link"] / 1e6, 3)])
    table = markdown_table(headers, rows)
    checks = []
    aq, direct = results.get("aqsgd:fw=2,bw=4"), results.get("direct:fw=2,bw=4")
    if base and aq:
        ok = aq["delta_vs_none"] <= 0.03
        checks.append(f"- aqsgd fw2/bw4 within 0.03 nats of none: {aq['delta_vs_none']:+.4f} -> {'PASS' if ok else 'FAIL'}")
    if base and direct:
        ok = direct["delta_vs_none"] >= 0.08
        checks.append(f"- direct fw2/bw4 at least 0.08 worse than none: {direct['delta_vs_none']:+.4f} -> {'PASS' if ok else 'FAIL'}")
    notes = (
        f"Preset `{size_name}` on {args.device}: byte-level GPT-2 ({size.layers} x {size.hidden}, {size.heads} heads, "
        f"{config.num_parameters() / 1e6:.2f}M params), {size.stages} stages ({size.stages - 1} compressed links), "
        f"pre-trained {size.pretrain_steps} steps on {corpus_desc}, then fine-tuned {size.epochs} epochs on "
        f"{len(train)} held-out blocks of {size.seq_len} bytes (batch {size.finetune_batch}, AdamW lr {size.finetune_lr}, "
        f"no dropout). Columns ep*: mean training loss per epoch (through the compressed links); val: held-out "
        f"loss of the final weights; errors: relative L2 error at the links after epoch 0; MB/link: forward + "
        f"backward bytes on the wire per link over all epochs. Total {total_s:.0f}s.\n" + "\n".join(checks)
    )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(table)
        print(notes)
    if not args.no_record:
        record(f"Convergence through compressed boundaries ({size_name})", table, notes,
               doc=Path(args.record_to) if args.record_to else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
