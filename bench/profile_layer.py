"""Where the time of one MoE layer's forward+backward goes: the top kernels by device time
(torch.profiler), eager and compiled, so a kernel is fused or written only where it shows.

    python bench/profile_layer.py [--preset 8b] [--policy t5x] [--dtype bfloat16] [--top 15]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import describe_machine  # noqa: E402

from openmoe.moe import CapacityPolicy, MoELayer  # noqa: E402

PRESETS = {"base": (4096, 768, 2048, 16), "8b": (16384, 2048, 8192, 32)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="8b")
    ap.add_argument("--policy", default="t5x")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--compile", action="store_true", help="also profile the layer under torch.compile")
    args = ap.parse_args(argv)
    T, H, I, E = PRESETS[args.preset]
    if args.device == "cpu":
        T = min(T, 2048)
    dtype = getattr(torch, args.dtype)
    print(describe_machine())
    print(f"profile: {args.preset} T {T} H {H} I {I} E {E} top-2, {args.policy}, {args.dtype}, {args.device}",
          flush=True)
    with torch.device(args.device):
        layer = MoELayer(H, E, 2, experts="openmoe", intermediate_size=I, capacity=CapacityPolicy(args.policy),
                         aux_loss=0.01, z_loss=0.001, experts_implementation="grouped_mm")
    layer = layer.to(dtype).train()
    x = torch.randn(1, T, H, device=args.device, dtype=dtype, requires_grad=True)
    variants = [("eager", layer)]
    if args.compile:
        variants.append(("compiled", torch.compile(layer, fullgraph=True)))
    act = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        act.append(torch.profiler.ProfilerActivity.CUDA)
    for name, fn in variants:
        def step():
            y, out = fn(x)
            (y.float().square().mean() + out.loss).backward()
        for _ in range(3):  # warm-up (and compilation)
            step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        with torch.profiler.profile(activities=act) as prof:
            for _ in range(3):
                step()
            if args.device == "cuda":
                torch.cuda.synchronize()
        key = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(f"\n== {name}: top {args.top} by {key} (3 steps) ==")
        print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
