"""Whole training step of OpenMoE (base widths, 4 layers, vocab 32000, batch 2 x 512) with the
experts on torch grouped_mm vs the per-expert loop, fp32 and bf16, same model and data: the
measurement behind `experts_implementation_name: auto`.

    python bench/expert_kernels.py [--iters 3]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def step_time(dtype: torch.dtype, policy: str, impl: str, ids: torch.Tensor, iters: int) -> float:
    from common import timeit
    from openmoe import OpenMoeConfig, OpenMoeForCausalLM

    torch.manual_seed(0)
    cfg = OpenMoeConfig(vocab_size=32000, num_hidden_layers=4, moe_layer_interval=2, capacity_policy=policy,
                        experts_implementation_name=impl)
    model = OpenMoeForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timeit(step, warmup=1, iters=iters)


def main() -> None:
    from common import describe_machine, retain_freed_memory

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--no-retain", action="store_true",
                   help="leave glibc's allocator as it is (train.py keeps freed CPU memory for reuse)")
    args = p.parse_args()
    print(describe_machine())
    retained = not args.no_retain and retain_freed_memory()
    print(f"allocator: {'freed memory kept for reuse, as train.py does' if retained else 'default'}")
    ids = torch.randint(2, 32000, (2, 512))
    print("| dtype | policy | grouped_mm s/step | eager s/step | eager / grouped_mm |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for policy in ("t5x", "dropless"):
            t = {impl: step_time(dtype, policy, impl, ids, args.iters) for impl in ("grouped_mm", "eager")}
            print(f"| {str(dtype)[6:]} | {policy} | {t['grouped_mm']:.2f} | {t['eager']:.2f} | "
                  f"{t['eager'] / t['grouped_mm']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
