"""The node's memory-bandwidth probe (swarm/hardware.py ``measure_mem_bandwidth_Bps``): the figure
it reports and what it costs at start, next to the TFLOPS probe, and what the disaggregation
prediction makes of the figures this machine's nodes would report.

    python -m bench.membw [--device cpu] [--repeats 5] [--no-record]

Each repeat runs the probe as ``swarm-node join`` does (about 0.2 s of copies after a warm-up
copy) and times the whole call, allocation included. The prediction row plans 4 nodes that all
report this machine's figures (2 chains of 1 stage, the unit tests' model shape): alike nodes,
so it must predict no gain.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._record import markdown_table, record  # noqa: E402
from swarm.hardware import measure_matmul_tflops, measure_mem_bandwidth_Bps  # noqa: E402


def _prediction(tflops: float, mem_bw: float) -> float:
    from swarm.scheduling.disaggregation import Workload, plan_disaggregation
    from swarm.scheduling.placement import Links, ModelShape, PlacementDevice

    shape = ModelShape(num_layers=8, hidden_size=1024, layer_bytes=50_000_000, embed_bytes=100_000_000,
                       head_bytes=100_000_000, kv_bytes_per_token_per_layer=8192, flops_per_token_per_layer=1e8,
                       activation_bytes_per_token=4096)
    n = 4
    links = Links(delay_s=tuple(tuple(0.0 if i == j else 1e-4 for j in range(n)) for i in range(n)),
                  bandwidth_Bps=tuple(tuple(float("inf") if i == j else 1e9 for j in range(n)) for i in range(n)))
    devs = [PlacementDevice(node_id=f"n{i}", tflops=tflops, memory_bytes=1 << 34) for i in range(n)]
    plan = plan_disaggregation(devs, links, shape, num_stages=1, workload=Workload(prompt_tokens=128,
                               response_tokens=16, batch_sessions=4), mem_bandwidth_Bps={d.node_id: mem_bw for d in devs})
    return plan.predicted_gain


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    # torch's import and first-call costs are not the probe's: the node has torch loaded when it probes
    measure_mem_bandwidth_Bps(args.device, duration_s=0.05, nbytes=1 << 20)
    bws, secs = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        bws.append(measure_mem_bandwidth_Bps(args.device))
        secs.append(time.perf_counter() - t0)
    tflops, dtype = measure_matmul_tflops(args.device, duration_s=1.0)
    bw = statistics.median(bws)
    gain = _prediction(tflops, bw)
    rows = [[args.device, f"{bw / 1e9:.2f}", f"{min(bws) / 1e9:.2f}-{max(bws) / 1e9:.2f}",
             f"{statistics.median(secs):.3f}", f"{max(secs):.3f}", f"{tflops:.4f} {dtype}",
             f"{bw / (tflops * 1e12):.3g}", f"{gain:.2f}x"]]
    headers = ["device", "mem BW GB/s (median)", "range", "probe s (median)", "probe s (max)", "TFLOPS",
               "bytes/FLOP", "predicted disagg gain, 4 such nodes"]
    table = markdown_table(headers, rows)
    print(table)
    if not args.no_record:
        record("Memory-bandwidth probe (bench/membw.py)", table, notes=(
            f"{args.repeats} probes as `swarm-node join` runs them (64 MiB buffer on CPU, ~0.2 s of copies, 2 bytes "
            "moved per byte copied), timed whole. The machine is shared (2 cores, other test runs), so the figure "
            "is this box's loaded bandwidth, not its peak. Four nodes reporting the same figures are alike: the "
            "prediction says no gain, as it should; this box cannot show a disaggregation gain (one CPU for "
            "every node process, nothing differs between nodes)."))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
