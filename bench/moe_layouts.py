"""The MoE layer's expert layouts at 2 CPU ranks (gloo): 'ep' (tokens travel by all_to_all,
experts stay) against 'gather' (experts all-gathered, gradients summed back; tokens stay), and
what 'auto' picks, for a few token counts per rank. Forward + backward of one layer.

    python bench/moe_layouts.py [--ranks 2] [--hidden 512] [--inter 1024] [--experts 8]
                                [--tokens 256,1024,4096] [--iters 3]

Expect 'gather' to win when tokens are many and experts small (moving E*3*H*I weights is cheaper
than moving 2*k*T*H activations each way), 'ep' otherwise; 'auto' measures and keeps the faster.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _worker(rank, world, port, args, out):
    import torch.distributed as dist

    from openmoe.moe import MoELayer
    from openmoe.parallel import expert_parallel, set_expert_layout

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    layer = MoELayer(args.hidden, args.experts, 2, experts="swiglu", intermediate_size=args.inter,
                     capacity="dropless").train()
    expert_parallel(layer)
    rows = []
    for T in args.tokens:
        x = torch.randn(T, args.hidden, requires_grad=True)
        row = {"tokens_per_rank": T}
        for layout in ("ep", "gather", "auto"):
            set_expert_layout(layer, layout)
            times = []
            for i in range(args.iters + (6 if layout == "auto" else 1)):  # warm-up; auto: its trials
                dist.barrier()
                t0 = time.perf_counter()
                y, _ = layer(x)
                y.square().mean().backward()
                dist.barrier()
                times.append(time.perf_counter() - t0)
            row[layout] = min(times[-args.iters:])
            if layout == "auto":
                row["auto_picked"] = sorted(set(layer.dispatcher.layout.decided.values()))
        rows.append(row)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def main():
    from common import describe_machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=[256, 1024, 4096])
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()
    print(describe_machine())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "rows.json")
    mp.spawn(_worker, args=(args.ranks, port, args, out), nprocs=args.ranks, join=True)
    rows = json.load(open(out))
    print(f"MoE layer fwd+bwd, {args.ranks} gloo ranks, H={args.hidden} I={args.inter} E={args.experts} "
          f"top-2 SwiGLU, dropless, fp32 (min of {args.iters})")
    print(f"{'tokens/rank':>12} {'ep s':>9} {'gather s':>9} {'gather/ep':>10} {'auto s':>9}  auto picked")
    for r in rows:
        print(f"{r['tokens_per_rank']:>12} {r['ep']:>9.4f} {r['gather']:>9.4f} {r['gather'] / r['ep']:>10.2f} "
              f"{r['auto']:>9.4f}  {','.join(r['auto_picked'])}")


if __name__ == "__main__":
    main()
