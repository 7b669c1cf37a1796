"""What this machine can do: device, memory, cores, disk, *measured* matmul TFLOPS and memory bandwidth.

:func:`probe` fills a :class:`HardwareInfo`. The TFLOPS figure is measured, not looked up:
dense square matmuls in the dtype the node would train in (float32 on CPU, bfloat16 on
GPUs that support it, float16 otherwise) for about ``duration_s`` seconds. The memory
bandwidth is measured next to it (:func:`measure_mem_bandwidth_Bps`): timed copies of a
buffer far larger than any cache, on the device (a decode step is bound by it, a prefill by
the TFLOPS: swarm/scheduling/disaggregation.py). 0 means unmeasured (nodes older than it).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEVICE_KINDS = ("cpu", "cuda")
MAX_TFLOPS = 1e5  # nothing a volunteer owns comes near 100 PFLOPS: beyond is a lie or a bug
# Memory bandwidth, when measured: an H200 has 4.8 TB/s, a B200 8 TB/s; 50 TB/s is beyond any
# single device a volunteer owns. Under 100 MB/s no device could serve a model at all.
MIN_MEM_BANDWIDTH_BPS, MAX_MEM_BANDWIDTH_BPS = 1e8, 5e13
# ...and per FLOP/s: CPUs show ~0.1-1 byte per FLOP, GPUs ~0.005-0.05 (H100: 3.35e12 / 9.9e14).
# 20 is 20x past a slow, loaded CPU: placement believes no more than that per FLOP/s the
# coordinator measured (swarm.membership.effective_mem_bandwidth).
MAX_MEM_BYTES_PER_FLOP = 20.0


@dataclass(frozen=True, slots=True, kw_only=True)
class HardwareInfo:
    """A node's hardware. Memory is the compute device's (RAM for cpu), in bytes."""

    device: str  # torch device string: "cpu", "cuda:0"
    device_kind: str  # "cpu" | "cuda"
    device_name: str
    memory_bytes: int
    memory_free_bytes: int
    compute_capability: str = ""
    cpu_cores: int
    ram_bytes: int
    disk_free_bytes: int
    tflops: float
    tflops_dtype: str
    mem_bandwidth_Bps: float = 0.0  # measured device memory bandwidth, bytes/s; 0 = unmeasured (older node)

    def __post_init__(self) -> None:
        from swarm.errors import InvalidRequestError

        if self.device_kind not in DEVICE_KINDS:
            raise InvalidRequestError(f"device_kind must be one of {DEVICE_KINDS}, got {self.device_kind!r}")
        if not self.device.startswith(self.device_kind):
            raise InvalidRequestError(f"device {self.device!r} does not match device_kind {self.device_kind!r}")
        for name in ("memory_bytes", "memory_free_bytes", "ram_bytes", "disk_free_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0 or v > 1 << 56:
                raise InvalidRequestError(f"{name} must be an integer in 0..2^56, got {v!r}")
        if self.memory_free_bytes > self.memory_bytes:
            raise InvalidRequestError("memory_free_bytes exceeds memory_bytes")
        if not isinstance(self.cpu_cores, int) or not 0 < self.cpu_cores <= 1 << 16:
            raise InvalidRequestError(f"cpu_cores must be in 1..65536, got {self.cpu_cores!r}")
        if not (math.isfinite(self.tflops) and 0 <= self.tflops <= MAX_TFLOPS):
            raise InvalidRequestError(f"tflops must be finite and in 0..{MAX_TFLOPS:g}, got {self.tflops}")
        if self.tflops_dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidRequestError(f"tflops_dtype must be float32, bfloat16 or float16, got {self.tflops_dtype!r}")
        check_mem_bandwidth(self.mem_bandwidth_Bps)
        for name in ("device", "device_name", "compute_capability"):
            if len(getattr(self, name)) > 200:
                raise InvalidRequestError(f"{name} is longer than 200 characters")


def check_mem_bandwidth(mem_bandwidth_Bps: float) -> None:
    """Raises InvalidRequestError unless ``mem_bandwidth_Bps`` is 0 (unmeasured) or a plausible
    measurement: finite, in MIN..MAX_MEM_BANDWIDTH_BPS (what a :class:`HardwareInfo` holds; a
    figure from the network passes :func:`reported_mem_bandwidth` first, which takes a too-low one
    as unmeasured). (Its ratio to the TFLOPS is bounded
    where it is used, against the coordinator's own measurement: a ratio of two claims proves
    nothing, and a node told to claim less compute, SWARM_FAULT claim-tflops, must still start.)"""
    from swarm.errors import InvalidRequestError

    v = mem_bandwidth_Bps
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InvalidRequestError(f"mem_bandwidth_Bps must be a finite number of bytes/s, got {v!r}")
    if v == 0:
        return
    if not MIN_MEM_BANDWIDTH_BPS <= v <= MAX_MEM_BANDWIDTH_BPS:
        raise InvalidRequestError(
            f"mem_bandwidth_Bps {v:.4g} is outside the plausible {MIN_MEM_BANDWIDTH_BPS:g}..{MAX_MEM_BANDWIDTH_BPS:g} "
            "bytes/s; send 0 when it was not measured; a figure this high is a cache's, not memory's: "
            "restart swarm-node join (it re-probes) on an idle machine, or update swarm-node")


def reported_mem_bandwidth(mem_bandwidth_Bps: float) -> float:
    """What a node's reported memory bandwidth is taken as: 0 (unmeasured) when it is under
    MIN_MEM_BANDWIDTH_BPS (a starved probe: a node loaded enough that its timed copies crawl
    measured that, honestly; it registers as unmeasured, and its decode steps, once seen, tell
    how slow it is: swarm.membership.effective_mem_bandwidth), else the figure. Raises
    InvalidRequestError for what no measurement gives (not finite, negative) and for a figure
    above MAX_MEM_BANDWIDTH_BPS (an over-estimate the node must fix: :func:`check_mem_bandwidth`)."""
    from swarm.errors import InvalidRequestError

    v = mem_bandwidth_Bps
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InvalidRequestError(f"mem_bandwidth_Bps must be a finite number of bytes/s, got {v!r}")
    if 0 <= v < MIN_MEM_BANDWIDTH_BPS:
        return 0.0
    check_mem_bandwidth(v)
    return float(v)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _meminfo() -> tuple[int, int]:
    """(total, available) RAM in bytes."""
    total = avail = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "MemTotal":
                total = int(rest.split()[0]) * 1024
            elif key == "MemAvailable":
                avail = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if total == 0:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            avail = total
        except (ValueError, OSError):
            pass
    return total, min(avail, total)


def measure_matmul_tflops(device: str = "cpu", *, duration_s: float = 1.0, n: int | None = None) -> tuple[float, str]:
    """Measured dense matmul TFLOPS on ``device`` and the dtype used.

    Runs n x n @ n x n matmuls (2 n^3 flops each) for about ``duration_s`` after one warm-up.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        n = n or 8192
    else:
        dtype = torch.float32
        n = n or 512
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    torch.matmul(a, b)  # warm-up: kernels, allocator, threads
    sync()
    reps = 0
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < duration_s or reps < 2:
        torch.matmul(a, b)
        if dev.type == "cuda":
            # queue a few at once so launch latency does not count
            for _ in range(4):
                torch.matmul(a, b)
            reps += 4
        reps += 1
        sync()
        elapsed = time.perf_counter() - start
    flops = 2.0 * n**3 * reps
    return flops / elapsed / 1e12, str(dtype).removeprefix("torch.")


def measure_mem_bandwidth_Bps(device: str = "cpu", *, duration_s: float = 0.2, nbytes: int | None = None) -> float:
    """Measured memory bandwidth of ``device`` in bytes/s: copies of an ``nbytes`` buffer
    (default 64 MiB on CPU, 512 MiB on CUDA: beyond their caches, so the copy streams from
    memory), counting each byte read and written (2 x nbytes per copy, as STREAM's copy does).
    The first copy (pages touched, kernels loaded) is not counted; the call lasts about
    ``duration_s`` in all, allocation included, and at least two timed copies. The buffer is
    capped to an eighth of the free memory. On hosts whose last-level cache holds the buffer
    (some server CPUs have hundreds of MiB) the figure is partly cache bandwidth: an over-estimate,
    which the coordinator's bounds (:func:`check_mem_bandwidth`) do not catch; a larger buffer
    would cost the node's start seconds."""
    import torch

    t_start = time.perf_counter()
    dev = torch.device(device)
    nbytes = nbytes or ((512 << 20) if dev.type == "cuda" else (64 << 20))
    free = free_memory_bytes(str(dev))
    if free > 0:
        nbytes = max(1 << 20, min(nbytes, free // 8))
    n = nbytes // 4
    src = torch.empty(n, device=dev, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    dst.copy_(src)  # warm-up: pages touched, kernels loaded
    sync()
    reps = 0
    start = time.perf_counter()
    while reps < 2 or time.perf_counter() - t_start < duration_s:
        for _ in range(4 if dev.type == "cuda" else 1):  # queue a few so launch latency does not count
            dst.copy_(src)
            reps += 1
        sync()
    return 2.0 * n * 4 * reps / (time.perf_counter() - start)


def free_memory_bytes(device: str) -> int:
    """Free memory of ``device`` now (available RAM for cpu); 0 when it cannot be read."""
    try:
        if device.startswith("cuda"):
            import torch

            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        return _meminfo()[1]
    except Exception:  # noqa: BLE001 -- a heartbeat must not fail over a statistic
        return 0


def use_device(device: str) -> None:
    """Make ``device`` this process's current CUDA device (nothing for the CPU): what torch does
    without naming a device (pinned host buffers, CUDA events, default streams) must then be on
    the GPU this node computes on, not cuda:0 (an event recorded there never waits for copies
    queued on cuda:1). A node calls it once, after :func:`probe`."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))


def probe(device: str = "cpu", *, disk_path: str | Path = ".", matmul_duration_s: float = 1.0) -> HardwareInfo:
    """Probe this machine for ``device`` ("cpu", "cuda", "cuda:K")."""
    import torch

    from swarm.errors import ConfigError

    dev = torch.device(device)
    ram_total, ram_avail = _meminfo()
    cores = os.cpu_count() or 1
    disk_dir = Path(disk_path)
    while not disk_dir.exists() and disk_dir != disk_dir.parent:
        disk_dir = disk_dir.parent
    disk_free = shutil.disk_usage(disk_dir).free
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda asked for but torch sees no CUDA GPU; use --device cpu or install a CUDA build of torch")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(f"cuda:{index} does not exist; this machine has {torch.cuda.device_count()} GPUs")
        dev = torch.device("cuda", index)
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        name = props.name
        cc = f"{props.major}.{props.minor}"
        memory_total, memory_free = int(total), int(free)
    elif dev.type == "cpu":
        name, cc = _cpu_name(), ""
        memory_total, memory_free = ram_total, ram_avail
    else:
        raise ConfigError(f"device {device!r} is not supported; use cpu, cuda or cuda:K")
    tflops, dtype = measure_matmul_tflops(str(dev), duration_s=matmul_duration_s)
    tflops = float(min(tflops, MAX_TFLOPS))
    t0 = time.perf_counter()
    mem_bw = measure_mem_bandwidth_Bps(str(dev), duration_s=min(0.2, matmul_duration_s))
    mem_s = time.perf_counter() - t0
    # a figure out of range is this machine's oddity (or a loaded one), not a reason to refuse to
    # start: too high is capped, too low (a starved probe) is sent as 0 = unmeasured
    mem_bw = reported_mem_bandwidth(min(mem_bw, MAX_MEM_BANDWIDTH_BPS))
    info = HardwareInfo(
        device=str(dev),
        device_kind=dev.type,
        device_name=name,
        memory_bytes=int(memory_total),
        memory_free_bytes=int(min(memory_free, memory_total)),
        compute_capability=cc,
        cpu_cores=int(cores),
        ram_bytes=int(ram_total),
        disk_free_bytes=int(disk_free),
        tflops=tflops,
        tflops_dtype=dtype,
        mem_bandwidth_Bps=float(mem_bw),
    )
    log.info("hardware probed device=%s name=%r tflops=%.3f dtype=%s mem_bandwidth=%.3g B/s (%.2f s)", info.device,
             name, info.tflops, dtype, info.mem_bandwidth_Bps, mem_s)
    return info
