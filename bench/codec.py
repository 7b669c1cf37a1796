"""Codec throughput: fused quantize+pack and unpack+dequantize, CPU (C kernel) and CUDA (Triton).

Throughput is GB/s of fp16 *input* (the activation as it leaves the stage). CPU figures are for
one thread (one core). On CUDA the Triton kernels are timed with CUDA events, next to the torch
reference path, and checked against it. Also prints exact bytes on the wire per codec for a
GPT-2-small micro-batch.

    python -m bench.codec [--quick] [--json] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench._record import markdown_table, record
from swarm.compression import BoundaryCodec, CodecSpec, decode_tensor, encode_tensor, make_store
from swarm.compression import backends

BITS = (2, 3, 4, 8)
GROUP = 128


def _time_cpu(fn, reps: int) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds of this thread). On a shared machine the CPU time is
    the honest per-core figure: it excludes time the thread waited for a core."""
    fn()  # warm-up (and kernel build)
    best_wall = best_cpu = float("inf")
    for _ in range(reps):
        t, c = time.perf_counter(), time.thread_time()
        fn()
        best_cpu = min(best_cpu, time.thread_time() - c)
        best_wall = min(best_wall, time.perf_counter() - t)
    return best_wall, best_cpu


def _time_cuda(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def bench_cpu(numel: int, reps: int) -> list[dict]:
    torch.set_num_threads(1)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0)).half()
    gb = numel * 2 / 1e9
    rows = []
    paths = ["c", "torch"] if backends.cpu_kernel() is not None else ["torch"]
    for backend in paths:
        for bits in BITS:
            packed, lo, scale = backends.quantize_pack(x, bits, GROUP, backend=backend)
            t_enc = _time_cpu(lambda: backends.quantize_pack(x, bits, GROUP, backend=backend), reps if backend == "c" else 1)
            t_dec = _time_cpu(
                lambda: backends.unpack_dequantize(packed, lo, scale, numel, bits, GROUP, out_dtype=torch.float16, backend=backend),
                reps if backend == "c" else 1,
            )
            rows.append({"device": "cpu (1 thread)", "path": "C kernel" if backend == "c" else "torch reference",
                         "bits": bits, "quantize_pack_GBps": gb / t_enc[1], "unpack_dequant_GBps": gb / t_dec[1],
                         "quantize_pack_wall_GBps": gb / t_enc[0], "unpack_dequant_wall_GBps": gb / t_dec[0]})
    return rows


def bench_cuda(numel: int, reps: int) -> tuple[list[dict], list[str]]:
    from swarm.compression import triton_kernels

    x = torch.randn(numel, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0)).half()
    gb = numel * 2 / 1e9
    rows, checks = [], []
    for bits in BITS:
        ng = numel // GROUP
        if triton_kernels.available():
            out = torch.empty(ng * GROUP * bits // 8, dtype=torch.uint8, device="cuda")
            lo = torch.empty(ng, dtype=torch.float32, device="cuda")
            scale = torch.empty(ng, dtype=torch.float32, device="cuda")
            t_kernel = _time_cuda(lambda: triton_kernels.quantize_pack_unchecked(x, bits, GROUP, out, lo, scale), reps)
            t_full = _time_cuda(lambda: backends.quantize_pack(x, bits, GROUP, backend="triton"), reps)
            packed, lo2, sc2 = backends.quantize_pack(x, bits, GROUP, backend="triton")
            t_dec = _time_cuda(
                lambda: backends.unpack_dequantize(packed, lo2, sc2, numel, bits, GROUP, out_dtype=torch.float16, backend="triton"),
                reps,
            )
            rows.append({"device": torch.cuda.get_device_name(0), "path": "Triton fused (kernel only)", "bits": bits,
                         "quantize_pack_GBps": gb / t_kernel, "unpack_dequant_GBps": gb / t_dec})
            rows.append({"device": torch.cuda.get_device_name(0), "path": "Triton fused + NaN check (sync)", "bits": bits,
                         "quantize_pack_GBps": gb / t_full, "unpack_dequant_GBps": float("nan")})
            # correctness against the torch reference on the same GPU
            p_ref, lo_ref, s_ref = backends.quantize_pack(x, bits, GROUP, backend="torch")
            same_scales = torch.equal(lo_ref, lo2) and torch.equal(s_ref, sc2)
            byte_agree = (p_ref == packed).float().mean().item()
            y_tri = backends.unpack_dequantize(packed, lo2, sc2, numel, bits, GROUP, out_dtype=torch.float16, backend="triton")
            y_ref = backends.unpack_dequantize(packed, lo2, sc2, numel, bits, GROUP, out_dtype=torch.float16, backend="torch")
            m = 1 << 20  # a CPU decode of the first million values must give the same bits
            y_cpu = backends.unpack_dequantize(packed[: m * bits // 8].cpu(), lo2[: m // GROUP].cpu(),
                                               sc2[: m // GROUP].cpu(), m, bits, GROUP, out_dtype=torch.float16)
            checks.append(
                f"- {bits} bits: Triton vs torch scales identical={same_scales}, packed bytes agree {byte_agree * 100:.4f}%, "
                f"Triton decode == torch decode: {torch.equal(y_tri, y_ref)}, == CPU decode: "
                f"{torch.equal(y_cpu, y_tri[: y_cpu.numel()].cpu())}"
            )
        t_torch = _time_cuda(lambda: backends.quantize_pack(x, bits, GROUP, backend="torch"), max(1, reps // 4))
        packed_t, lo_t, sc_t = backends.quantize_pack(x, bits, GROUP, backend="torch")
        t_dec_t = _time_cuda(
            lambda: backends.unpack_dequantize(packed_t, lo_t, sc_t, numel, bits, GROUP, out_dtype=torch.float16, backend="torch"),
            max(1, reps // 4),
        )
        rows.append({"device": torch.cuda.get_device_name(0), "path": "torch reference", "bits": bits,
                     "quantize_pack_GBps": gb / t_torch, "unpack_dequant_GBps": gb / t_dec_t})
    return rows, checks


def wire_sizes() -> list[list[object]]:
    """Exact bytes per micro-batch message (16 x 256 x 768 fp16 activations, a sample's later visit)."""
    shape = (16, 256, 768)
    a = torch.randn(*shape).half()
    ids = list(range(16))
    raw = a.numel() * 2
    rows = []
    for spec in ("none", "direct:fw=8,bw=8", "direct:fw=4,bw=8", "direct:fw=2,bw=4", "aqsgd:fw=4,bw=8",
                 "aqsgd:fw=3,bw=6", "aqsgd:fw=2,bw=4"):
        s = CodecSpec.parse(spec)
        store = make_store(key="k", num_samples=16, row_shape=shape[1:]) if s.kind == "aqsgd" else None
        codec = BoundaryCodec(s, key="k", store=store)
        fw = codec.encode_forward(a, ids)
        if s.kind == "aqsgd":
            fw = codec.encode_forward(a, ids)  # second visit: deltas
        bw = codec.encode_backward(a, ids)
        assert fw.nbytes == len(fw.to_bytes()) and bw.nbytes == len(bw.to_bytes())
        rows.append([spec, fw.nbytes, bw.nbytes, round(raw / fw.nbytes, 2), round(raw / bw.nbytes, 2)])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller tensors, fewer repetitions")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--record-to", default=None)
    args = ap.parse_args(argv)
    rows: list[dict] = []
    checks: list[str] = []
    if args.device in ("cpu", "all"):
        rows += bench_cpu(numel=(4 << 20) if args.quick else (32 << 20), reps=3 if args.quick else 5)
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        r, checks = bench_cuda(numel=(32 << 20) if args.quick else (256 << 20), reps=20 if args.quick else 50)
        rows += r
    sizes = wire_sizes()
    table = markdown_table(
        ["device", "path", "bits", "quantize+pack GB/s", "unpack+dequant GB/s", "wall-clock q+p / u+d GB/s"],
        [[r["device"], r["path"], r["bits"], round(r["quantize_pack_GBps"], 2), round(r["unpack_dequant_GBps"], 2),
          f'{r["quantize_pack_wall_GBps"]:.2f} / {r["unpack_dequant_wall_GBps"]:.2f}' if "quantize_pack_wall_GBps" in r else "-"]
         for r in rows],
    )
    size_table = markdown_table(["codec", "forward bytes", "backward bytes", "fw ratio vs fp16", "bw ratio vs fp16"], sizes)
    notes = (
        f"GB/s of fp16 input, group size {GROUP}, round-to-nearest. CPU: one thread, best of several runs, "
        "GB per CPU-second of the thread (per core; the wall-clock column also counts time spent waiting for a "
        "core on a shared machine). CUDA: timed with events over repeated calls on one large tensor.\n\n"
        "Bytes on the wire per micro-batch of 16 x 256 x 768 fp16 activations (aqsgd: a later visit; "
        "the first visit is sent raw), exact (`len(msg.to_bytes())`):\n\n" + size_table
        + ("\n\nTriton correctness vs the torch reference:\n" + "\n".join(checks) if checks else "")
    )
    if args.json:
        print(json.dumps({"throughput": rows, "wire_bytes": sizes, "checks": checks}, indent=2))
    else:
        print(table)
        print()
        print(notes)
    if not args.no_record:
        record("Codec throughput", table, notes, doc=Path(args.record_to) if args.record_to else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
