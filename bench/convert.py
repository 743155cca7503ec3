"""T5X -> HF conversion throughput against its limit: reading and inflating the same files.

    python bench/convert.py [--scale 1.0 | --config base] [--workers 2] [--keep DIR]

Writes a synthetic OpenMoE checkpoint in the real T5X format (gzip level 1 chunks as
tensorstore writes them, pod-like layouts: embedding in 8 row chunks, one chunk per expert,
other arrays whole up to 64 MiB), then times, on a warm page cache:
  limit     read every chunk file + zlib inflate it (nothing else), same thread count
  convert   the full conversion (convert_jax_checkpoint.py's code path, progress bar off),
            with and without fsync of the output, each in a fresh process whose peak RSS
            (ru_maxrss: imports included, as the CLI) is reported
Throughput is parameter bytes (float32, decoded) per second; "x 1-thread gunzip" is the
conversion's throughput over single-thread read+inflate of the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "checkpoint"))  # the T5X format writer of the tests

from common import describe_machine  # noqa: E402
from openmoe import OpenMoeConfig  # noqa: E402
from openmoe.checkpoint import T5XCheckpoint  # noqa: E402
from openmoe.checkpoint.infer_config import load_config  # noqa: E402
from t5x_fixture import random_params, write_checkpoint  # noqa: E402

_64MIB = 64 << 20


def bench_config(scale: float) -> OpenMoeConfig:
    """OpenMoE-base widths (H 768, I 2048, 12 x 64 heads, 16 experts) on 4 layers, the last one
    MoE, and a 32k vocab: about 0.75 GB of float32 at scale 1."""
    return OpenMoeConfig(vocab_size=int(32128 * scale) // 128 * 128, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=4, num_attention_heads=12, head_dim=64, num_experts=16,
                         moe_layer_interval=4)


def pod_chunks(name: str, shape) -> list[int]:
    if "/expert/" in name:
        return [1, *shape[1:]]
    if name == "token_embedder/embedding":
        return [-(-shape[0] // 8), shape[1]]
    rows = max(1, _64MIB // (4 * max(1, int(torch.tensor(shape[1:]).prod()))))
    return [min(shape[0], rows), *shape[1:]]


def limit(folder: Path, workers: int) -> float:
    """Seconds to read and inflate every parameter chunk file once."""
    with T5XCheckpoint(folder) as ckpt:
        files = [f for p in ckpt.params.values() if p.array is not None
                 for f in sorted(p.source.iterdir()) if f.name != ".zarray"]

    def inflate(f: Path) -> int:
        with open(f, "rb") as fh:
            return len(zlib.decompress(fh.read(), 47))

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(inflate, files))
    return time.perf_counter() - t


_CHILD = """
import json, resource, sys, time
import torch
torch.set_num_threads(2)
from openmoe.checkpoint import convert
folder, out, workers, fsync = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
t = time.perf_counter()
convert(folder, out, head_dim=64, max_shard_size="5GB", workers=workers, progress=False, fsync=fsync,
        log=lambda *_: None)
s = time.perf_counter() - t
print(json.dumps({"s": s, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def time_convert(folder: Path, workers: int, fsync: bool) -> tuple[float, int]:
    """(seconds of convert(), peak RSS of the process in bytes), in a fresh process."""
    out = Path(tempfile.mkdtemp(dir=folder.parent)) / "hf"
    r = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(out), str(workers), "1" if fsync else "0"],
                       capture_output=True, text=True, cwd=ROOT, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    shutil.rmtree(out.parent)
    if r.returncode:
        raise SystemExit(r.stderr)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    return got["s"], got["peak"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0, help="vocab scale (1.0: ~0.75 GB checkpoint)")
    ap.add_argument("--config", help="a shipped size (base: ~3.2 GB of float32) instead of the 4-layer model")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--keep", help="folder to keep (and reuse) the synthetic checkpoint in")
    args = ap.parse_args()
    print(describe_machine())
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="openmoe-bench-"))
    folder = base / "checkpoint_1"
    cfg = load_config(args.config) if args.config else bench_config(args.scale)
    if not folder.exists():
        t = time.perf_counter()
        write_checkpoint(folder, random_params(cfg), chunks=pod_chunks)
        print(f"wrote synthetic checkpoint in {time.perf_counter() - t:.1f}s")
    with T5XCheckpoint(folder) as ckpt:
        nbytes = sum(p.nbytes for p in ckpt.params.values())
        stored = sum(p.array.stored_nbytes() for p in ckpt.params.values() if p.array is not None)
    print(f"checkpoint: {len(ckpt.params)} arrays, {nbytes / 1e6:.0f} MB float32, {stored / 1e6:.0f} MB gzip on disk")
    limit(folder, args.workers)  # warm the page cache: both sides read from memory
    threads = sorted({1, args.workers})
    best: dict = {}
    peak = 0
    for _ in range(args.repeats):  # interleaved, best of each: fair on a shared machine
        for w in threads:
            best[w, "limit"] = min(best.get((w, "limit"), float("inf")), limit(folder, w))
            for key, fsync in (("fsync", True), ("nosync", False)):
                s, rss = time_convert(folder, w, fsync)
                best[w, key] = min(best.get((w, key), float("inf")), s)
                peak = max(peak, rss)
    print("| threads | read+inflate (limit) | convert (fsync) | convert (no fsync) | convert / limit |"
          " x 1-thread gunzip |")
    print("|---|---|---|---|---|---|")
    mb = nbytes / 1e6
    for w in threads:
        lim, conv, nosync = best[w, "limit"], best[w, "fsync"], best[w, "nosync"]
        print(f"| {w} | {mb / lim:.0f} MB/s ({lim:.2f}s) | {mb / conv:.0f} MB/s ({conv:.2f}s) | "
              f"{mb / nosync:.0f} MB/s ({nosync:.2f}s) | {conv / lim:.2f}x ({nosync / lim:.2f}x no fsync) | "
              f"{best[1, 'limit'] / conv:.2f}x ({best[1, 'limit'] / nosync:.2f}x no fsync) |")
    print(f"peak RSS of a conversion process (max over all runs): {peak / 1e9:.2f} GB")
    if not args.keep:
        shutil.rmtree(base)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
