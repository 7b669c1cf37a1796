"""Fused quantize+pack / unpack+dequantize, dispatched to the fastest available implementation.

- CUDA tensors with Triton installed: the Triton kernels in :mod:`swarm.compression.triton_kernels`.
- CPU tensors: a small C kernel (``_cpu_kernel.c``) compiled once with the system C compiler into
  a per-user cache and loaded with ctypes; without a compiler, the torch reference.
- Otherwise (or ``backend="torch"``, or stochastic rounding): the torch reference in
  :mod:`swarm.compression.quantizer`.
All give the same reconstruction bits as the reference (tests compare them), so a CPU sender and
a GPU receiver agree.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from swarm.compression import quantizer as ref
from swarm.errors import InvalidRequestError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "c", "triton")
_DT_CODE = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}

_lock = threading.Lock()
_cpu_lib: ctypes.CDLL | None = None
_cpu_tried = False


def _cache_dir() -> Path:
    base = Path.home() / ".cache" / "swarm" / "kernels"
    try:
        base.mkdir(parents=True, exist_ok=True)
        return base
    except OSError:
        d = Path(tempfile.gettempdir()) / "swarm-kernels"
        d.mkdir(parents=True, exist_ok=True)
        return d


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def cpu_kernel() -> ctypes.CDLL | None:
    """The compiled C kernel, building it on first use; None when no compiler is available."""
    global _cpu_lib, _cpu_tried
    if _cpu_tried:
        return _cpu_lib
    with _lock:
        if _cpu_tried:
            return _cpu_lib
        _cpu_tried = True
        if sys.byteorder != "little":
            return None
        src = Path(__file__).with_name("_cpu_kernel.c")
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None or not src.is_file():
            log.info("no C compiler: CPU codec uses the torch reference (slower)")
            return None
        flags = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-std=c11"]
        key = hashlib.sha256(src.read_bytes() + " ".join(flags).encode() + _cpu_id().encode()).hexdigest()[:16]
        so = _cache_dir() / f"swarm_codec_{key}.so"
        if not so.is_file():
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            try:
                subprocess.run([cc, *flags, "-o", str(tmp), str(src)], check=True, capture_output=True, timeout=120)
                os.replace(tmp, so)  # atomic: concurrent processes never load a half-written file
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("building the CPU codec kernel failed (%s); using the torch reference", exc)
                tmp.unlink(missing_ok=True)
                return None
        lib = ctypes.CDLL(str(so))
        lib.swarm_quantize_pack.restype = ctypes.c_int
        lib.swarm_quantize_pack.argtypes = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int64,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.swarm_unpack_dequantize.restype = None
        lib.swarm_unpack_dequantize.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int64,
            ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
        ]
        _cpu_lib = lib
        return lib


def triton_available() -> bool:
    from swarm.compression import triton_kernels

    return triton_kernels.available()


def _pick(backend: str, device: torch.device, dtype: torch.dtype, group_size: int) -> str:
    if backend not in BACKENDS:
        raise InvalidRequestError(f"codec backend {backend!r} is not one of {BACKENDS}")
    if backend != "auto":
        return backend
    # Triton tiles hold whole groups: power-of-two sizes up to 4096 (per-channel groups of many
    # rows go to the torch path)
    if (device.type == "cuda" and dtype in _DT_CODE and group_size & (group_size - 1) == 0
            and group_size <= 4096 and triton_available()):
        return "triton"
    if device.type == "cpu" and dtype in _DT_CODE and cpu_kernel() is not None:
        return "c"
    return "torch"


def quantize_pack(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8, lo float32 (ng,), scale float32 (ng,)) of ``x`` on its device.

    Raises InvalidRequestError for NaN/Inf in ``x`` or bad bits/group size.
    """
    ref.check_bits(bits)
    ref.check_group_size(group_size)
    n = x.numel()
    ng = ref.num_groups(n, group_size)
    which = "torch" if stochastic else _pick(backend, x.device, x.dtype, group_size)
    if which == "c":
        lib = cpu_kernel()
        if lib is None or x.device.type != "cpu":
            raise InvalidRequestError("the C codec backend needs a CPU tensor and a C compiler")
        xc = x.detach().contiguous()
        if xc.dtype not in _DT_CODE:
            xc = xc.float()
        out = torch.empty(ng * group_size * bits // 8, dtype=torch.uint8)
        lo = torch.empty(ng, dtype=torch.float32)
        scale = torch.empty(ng, dtype=torch.float32)
        scratch = torch.empty(group_size * 2, dtype=torch.float32)
        rc = lib.swarm_quantize_pack(
            xc.data_ptr(), _DT_CODE[xc.dtype], n, bits, group_size,
            out.data_ptr(), lo.data_ptr(), scale.data_ptr(), scratch.data_ptr(),
        )
        if rc:
            raise InvalidRequestError("cannot quantize a tensor holding NaN or Inf; check the model for divergence")
        return out, lo, scale
    if which == "triton":
        from swarm.compression import triton_kernels

        return triton_kernels.quantize_pack(x.detach(), bits, group_size)
    codes, lo, scale = ref.quantize_codes(x.detach(), bits, group_size, stochastic=stochastic, generator=generator)
    return ref.pack_codes(codes, bits), lo, scale


def unpack_dequantize(
    packed: torch.Tensor,
    lo: torch.Tensor,
    scale: torch.Tensor,
    numel: int,
    bits: int,
    group_size: int,
    *,
    out_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """Values (numel,) in ``out_dtype`` (via float32, rounded to nearest even) on packed's device."""
    which = _pick(backend, packed.device, out_dtype, group_size)
    if which == "c" and out_dtype in (torch.float32, torch.float16):
        lib = cpu_kernel()
        out = torch.empty(numel, dtype=out_dtype)
        codes = torch.empty(group_size, dtype=torch.uint8)
        lib.swarm_unpack_dequantize(
            packed.contiguous().data_ptr(), lo.contiguous().data_ptr(), scale.contiguous().data_ptr(),
            numel, bits, group_size, out.data_ptr(), _DT_CODE[out_dtype], codes.data_ptr(),
        )
        return out
    if which == "triton":
        from swarm.compression import triton_kernels

        return triton_kernels.unpack_dequantize(packed, lo, scale, numel, bits, group_size, out_dtype)
    codes = ref.unpack_codes(packed, bits)
    return ref.dequantize_codes(codes, lo, scale, numel, group_size).to(out_dtype)
