"""What machine is this: CPU model and SIMD flags, native bf16, a measured matmul peak."""

from __future__ import annotations

import platform
import time

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_info() -> dict:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    simd = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    return {"model": model, "simd": simd, "native_bf16": any(f in flags for f in BF16_FLAGS),
            "threads": torch.get_num_threads()}


def describe_machine() -> str:
    i = cpu_info()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"CPU: {i['model']} | threads {i['threads']} | native bf16: {i['native_bf16']}\n"
            f"flags: {' '.join(i['simd'])}\nGPU: {gpu} | torch {torch.__version__}")


def default_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16; fp32 elsewhere (an AVX2-only CPU runs a bf16
    matmul some 400x slower than fp32)."""
    if device.startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if cpu_info()["native_bf16"] else torch.float32


def timeit(fn, warmup: int = 1, iters: int = 3) -> float:
    """Median seconds per call (synchronising CUDA around each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def matmul_peak(dtype: torch.dtype, device: str = "cpu", n: int = 2048, reps: int | None = None) -> float:
    """Measured GEMM GFLOP/s of a square n x n x n matmul of this dtype on this device. Each timed
    call runs `reps` matmuls back to back (default: 1 on CPU; on CUDA enough for ~2 TFLOP, at most
    64, so that the launch and the synchronisation around the call do not count against a GPU
    GEMM that lasts well under a millisecond)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    flops = 2 * n ** 3
    if reps is None:
        reps = 1 if torch.device(device).type == "cpu" else max(1, min(64, round(2e12 / flops)))
    out = torch.empty(n, n, device=device, dtype=dtype)

    def run():
        for _ in range(reps):
            torch.matmul(a, b, out=out)

    return reps * flops / timeit(run) / 1e9


def measured_peak(dtype: torch.dtype, device: str = "cpu", sizes: tuple[int, ...] | None = None,
                  tries: int = 3) -> float:
    """The peak GFLOP/s that MFU divides by, when peak_tflops is not given: the BEST rate of
    square matmuls of this dtype on this device over a few sizes (CPU 1024, 2048; CUDA 2048,
    4096, 8192) and `tries` timings each, after a warm-up call. A single median timing of one
    size, taken once at start, read low when the first call was cold (thread pool start-up,
    CPU clocks ramping: measured 163 against 326 GFLOP/s on the next call) or the machine was
    busy for a moment, and a low peak is what lets a logged MFU pass 100%. The trainer also
    measures again when a logged window runs faster than the peak (Trainer._check_peak)."""
    cuda = torch.device(device).type == "cuda"
    sizes = sizes or ((2048, 4096, 8192) if cuda else (1024, 2048))
    best = 0.0
    for i, n in enumerate(sorted(sizes)):
        if i and 2 * n ** 3 / (best * 1e9) > 1.0:  # a slow dtype here (bf16 without AVX-512): stop
            break
        best = max(best, *(matmul_peak(dtype, device, n=n) for _ in range(tries)))
    return best


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def retain_freed_memory() -> bool:
    """Keep memory that the process frees mapped, for reuse (the CPU counterpart of CUDA's caching
    allocator). glibc serves big blocks with mmap and unmaps them on free, so a training step that
    allocates and frees the same 100-200 MB buffers (bf16 copies of the expert stacks and their
    gradients, the logits) page-faults every page of them again each step: measured on a bf16
    OpenMoE step, copies and fills of such buffers ran 5-10x slower than memory bandwidth and cost
    ~40% of the step. Serving every block from the heap and never trimming it removes that; the
    price is a resident size that stays at its high-water mark (+11% peak on that step).
    Numerics are unchanged. Linux/glibc only; returns whether it was applied."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the libc this process runs on
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
