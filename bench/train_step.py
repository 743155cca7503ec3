"""Training-step speed at base-like shapes: tokens/s and MFU of OpenMoE against HF transformers'
Mixtral (experts_implementation grouped_mm) at matched shapes, fp32 and bf16, in one run.

    python bench/train_step.py [--layers 4] [--seq 512] [--batch 2] [--vocab 32000] [--iters 3]

Shapes: OpenMoE-base widths (H 768, I 2048, 12 x 64 heads, E 16, top-2) with fewer layers and a
smaller vocabulary so a step fits a laptop CPU. OpenMoE has MoE every 2nd layer here (plus the
extra dense MLP); Mixtral has MoE in every layer: each model's MFU uses its own FLOPs per token
(6 x active parameters + attention), against the same measured matmul peak. OpenMoE does more
work per token than Mixtral at these widths (its gate projection is 2I wide, then the gated
activation halves it: four H x I matrices per MLP to Mixtral's three), so the last column (FLOP/s,
i.e. tokens/s x FLOPs per token) is the equal-work comparison.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import cpu_info, describe_machine, matmul_peak, retain_freed_memory, timeit  # noqa: E402


def mixtral_flops_per_token(model, seq):
    cfg = model.config
    act = 0
    for n, p in model.named_parameters():
        if n.startswith("model.embed_tokens"):
            continue
        act += p.numel() * cfg.num_experts_per_tok // cfg.num_local_experts if ".experts." in n else p.numel()
    return 6 * act + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--no-retain", action="store_true",
                    help="leave glibc's allocator as it is (train.py keeps freed CPU memory for reuse)")
    args = ap.parse_args(argv)
    import openmoe  # noqa: F401
    from openmoe import OpenMoeConfig, OpenMoeForCausalLM
    from openmoe.training.metrics import flops_per_token
    from transformers import MixtralConfig, MixtralForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(describe_machine())
    retained = device == "cpu" and not args.no_retain and retain_freed_memory()
    print(f"allocator: {'freed memory kept for reuse, as train.py does (every model)' if retained else 'default'}")
    print(f"shapes: layers {args.layers}, H 768, I 2048, heads 12x64, E 16 top-2, vocab {args.vocab}, "
          f"batch {args.batch} x seq {args.seq}\n")
    print("| model | dtype | policy | s/step | tokens/s | MFU | vs HF Mixtral tokens/s | vs HF Mixtral FLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        if dtype == torch.bfloat16 and device == "cpu" and not cpu_info()["native_bf16"]:
            print(f"| - | {dname} | - | skipped: no native bf16 on this CPU | | | |")
            continue
        peak = max(matmul_peak(dtype, device), matmul_peak(dtype, device, n=3072)) * 1e9
        torch.manual_seed(0)
        ids = torch.randint(2, args.vocab, (args.batch, args.seq), device=device)
        ntok = ids.numel()
        results = {}
        mcfg = MixtralConfig(vocab_size=args.vocab, hidden_size=768, intermediate_size=2048,
                             num_hidden_layers=args.layers, num_attention_heads=12, num_key_value_heads=12,
                             head_dim=64, num_local_experts=16, num_experts_per_tok=2)
        mcfg._experts_implementation = "grouped_mm"
        mix = MixtralForCausalLM(mcfg).to(device)
        runs = [("HF Mixtral grouped_mm", "dropless", mix, mixtral_flops_per_token(mix, args.seq))]
        for policy in ("t5x", "dropless"):
            cfg = OpenMoeConfig(vocab_size=args.vocab, num_hidden_layers=args.layers, moe_layer_interval=2,
                                capacity_policy=policy)
            m = OpenMoeForCausalLM(cfg).to(device)
            runs.append((f"openmoe {policy}", policy, m, flops_per_token(m, args.seq)))
        for name, policy, model, fpt in runs:
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the trainer's choice, for both

            def step():
                with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                    out = model(input_ids=ids, labels=ids, use_cache=False)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            s = timeit(step, warmup=1, iters=args.iters)
            tps = ntok / s
            results[name] = (tps, tps * fpt)
            ratio = tps / results["HF Mixtral grouped_mm"][0]
            work = tps * fpt / results["HF Mixtral grouped_mm"][1]
            print(f"| {name} | {dname} | {policy} | {s:.2f} | {tps:.0f} | {100 * tps * fpt / peak:.1f}% | "
                  f"{ratio:.2f}x | {work:.2f}x |", flush=True)
            del opt
        print(f"| (measured matmul peak {dname}: {peak / 1e9:.0f} GFLOP/s) | | | | | | | |")


if __name__ == "__main__":
    main()
