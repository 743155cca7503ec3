"""Forward+backward of one MoE layer at OpenMoE-base shapes, against a dense gated MLP of the same
active FLOPs and HF transformers' Mixtral sparse MoE block (grouped_mm and eager), in one run.

    python bench/moe_layer.py [--tokens 4096] [--dtypes float32,bfloat16] [--iters 3]

Reports seconds, GFLOP/s (model FLOPs: 3 x forward GEMM FLOPs of the kept assignments),
ratios to the dense layer, and the fraction of a measured matmul peak. Results go to
docs/benchmarks.md by hand, with the command line.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import describe_machine, matmul_peak, timeit, cpu_info  # noqa: E402

from openmoe.moe import CapacityPolicy, MoELayer  # noqa: E402
from openmoe.modeling_openmoe import OpenMoeMLP  # noqa: E402


def _init(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module


def fwd_bwd(module, x, call):
    def run():
        x.grad = None
        module.zero_grad(set_to_none=True)
        y = call(module, x)
        y.backward(torch.ones_like(y))
    return run


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    T, H, I, E, K = args.tokens, args.hidden, args.intermediate, args.experts, args.top_k
    print(describe_machine())
    print(f"shapes: tokens {T}, H {H}, I {I}, E {E}, top-{K}, device {args.device}\n")

    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        if dtype == torch.bfloat16 and args.device == "cpu" and not cpu_info()["native_bf16"]:
            print(f"{dname}: skipped (no native bf16 on this CPU: bf16 matmul would run ~400x slower)\n")
            continue
        peak = max(matmul_peak(dtype, args.device), matmul_peak(dtype, args.device, n=3072))
        x = torch.randn(1, T, H, device=args.device, dtype=dtype, requires_grad=True)
        gemm_moe = 2 * T * K * 4 * H * I  # gate (2I) + up (I) + down (I): 4HI MACs per assignment
        rows = []

        dense = _init(OpenMoeMLP(H, K * I)).to(args.device, dtype)  # same active FLOPs
        rows.append(("dense gated MLP (I x k)", timeit(fwd_bwd(dense, x, lambda m, x: m(x)), 1, args.iters),
                     3 * gemm_moe))
        for policy in ("dropless", "t5x"):
            for impl in ("grouped_mm", "eager"):
                layer = _init(MoELayer(H, I, E, K, capacity=CapacityPolicy(policy), experts_implementation=impl))
                layer = layer.to(args.device, dtype).train()
                kept = layer(x.detach())[1].tokens_per_expert.sum().item()
                s = timeit(fwd_bwd(layer, x, lambda m, x: m(x)[0]), 1, args.iters)
                rows.append((f"openmoe {policy} {impl}", s, 3 * 2 * kept * 4 * H * I))
        for impl in ("grouped_mm", "eager"):
            cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
            cfg._experts_implementation = impl
            blk = _init(MixtralSparseMoeBlock(cfg)).to(args.device, dtype)
            # Mixtral's SwiGLU expert is 3HI MACs (ours is 4HI): FLOPs counted for its own shape.
            rows.append((f"HF Mixtral block {impl}", timeit(fwd_bwd(blk, x, lambda m, x: m(x)), 1, args.iters),
                         3 * 2 * T * K * 3 * H * I))

        t_dense = rows[0][1]
        print(f"{dname}: measured matmul peak {peak:.1f} GFLOP/s")
        print(f"| layer | s / fwd+bwd | GFLOP/s | x dense time | % of peak |")
        print(f"|---|---|---|---|---|")
        for name, s, flops in rows:
            g = flops / s / 1e9
            print(f"| {name} | {s:.3f} | {g:.1f} | {s / t_dense:.2f} | {100 * g / peak:.0f}% |")
        print()


if __name__ == "__main__":
    main()
