"""LoRA against full fine-tuning: step time of the same model in one run, and the planner's peak.

    python bench/finetune.py                           # tiny and base widths on CPU
    python bench/finetune.py --widths base --layers 2 --seq 512 --batch 1 --iters 3
    python bench/finetune.py --gpu-8b                  # on a GPU: OpenMoE-8B LoRA at seq 2048

A step is what the trainer does: forward with labels, backward, clip_grad_norm, AdamW step.
Full fine-tuning trains every weight (fp32 master weights); LoRA (rank 8 on attention, dense and
extra MLPs and the stacked experts, through PEFT, experts on the grouped-GEMM path) trains the
adapter over a frozen base held in the compute dtype. "base" is OpenMoE-base's widths (H 768,
I 2048, 12 x 64 heads, E 16, top-2) with fewer layers (MoE every 2nd) and a smaller vocabulary.
With --gpu-8b: random OpenMoE-8B weights in bf16 on the GPU, LoRA, activation checkpointing,
tokens/s and torch.cuda.max_memory_allocated against the planner.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import describe_machine, timeit  # noqa: E402

WIDTHS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=32, num_experts=4),
    "base": dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, head_dim=64, num_experts=16),
}


def build(cfg, mode: str, dtype: torch.dtype, device: str):
    from openmoe import OpenMoeForCausalLM
    from openmoe.peft import LoraSpec, attach_lora
    from openmoe.training.optim import build_optimizer

    with torch.device(device):
        model = OpenMoeForCausalLM(cfg)
    if mode == "lora":
        model.to(dtype)
        attach_lora(model, LoraSpec())
    model.train()

    class Opt:
        optimizer, lr, weight_decay, betas = "adamw", 1e-4, 0.0, [0.9, 0.95]

    return model, build_optimizer(model, Opt)


def make_step(model, opt, ids, dtype, device):
    from openmoe.parallel import ParallelState, clip_grad_norm

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        clip_grad_norm(model, 1.0, ParallelState())
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def planned_peak(cfg, mode, batch, seq, dtype, device, checkpointing=False) -> float:
    from openmoe.planner.memory import Workload, plan_memory

    w = Workload(batch=batch, seq=seq, compute="bf16" if dtype == torch.bfloat16 else "fp32",
                 peft="lora" if mode == "lora" else None, checkpointing=checkpointing, device=device)
    return plan_memory(cfg, w).peak


def cpu_table(args) -> None:
    from openmoe import OpenMoeConfig

    dtype = getattr(torch, args.dtype)
    print(f"batch {args.batch} x seq {args.seq}, {args.dtype}, median of {args.iters} steps after a warm-up\n")
    print("| width | layers | mode | trained params | s/step | tokens/s | LoRA speed-up | planned peak |")
    print("|---|---|---|---|---|---|---|---|")
    for width in args.widths.split(","):
        layers = 4 if width == "tiny" else args.layers
        cfg = OpenMoeConfig(vocab_size=args.vocab, num_hidden_layers=layers, moe_layer_interval=2,
                            num_key_value_heads=WIDTHS[width]["num_attention_heads"], **WIDTHS[width])
        torch.manual_seed(0)
        ids = torch.randint(2, args.vocab, (args.batch, args.seq))
        times = {}
        for mode in ("full", "lora"):
            model, opt = build(cfg, mode, dtype, "cpu")
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            s = timeit(make_step(model, opt, ids, dtype, "cpu"), warmup=1, iters=args.iters)
            times[mode] = s
            speed = f"{times['full'] / s:.2f}x" if mode == "lora" else "1.00x"
            peak = planned_peak(cfg, mode, args.batch, args.seq, dtype, "cpu") / 2 ** 20
            print(f"| {width} | {layers} | {mode} | {trained / 1e6:.2f}M | {s:.3f} | {ids.numel() / s:.0f} | "
                  f"{speed} | {peak:.0f} MiB |", flush=True)
            del model, opt


def gpu_8b(args) -> None:
    from openmoe import OpenMoeConfig

    if not torch.cuda.is_available():
        raise SystemExit("--gpu-8b: no CUDA device here")
    root = os.path.join(os.path.dirname(__file__), "..", "configs", "8b")
    cfg = OpenMoeConfig.from_pretrained(root)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    model, opt = build(cfg, "lora", dtype, "cuda")
    model.activation_checkpointing_enable()
    ids = torch.randint(2, cfg.vocab_size, (1, 2048), device="cuda")
    step = make_step(model, opt, ids, dtype, "cuda")
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    s = timeit(step, warmup=0, iters=args.iters)
    peak = torch.cuda.max_memory_allocated()
    plan = planned_peak(cfg, "lora", 1, 2048, dtype, "cuda", checkpointing=True)
    print(f"OpenMoE-8B LoRA r=8, bf16, seq 2048, batch 1, activation checkpointing: {s:.3f} s/step, "
          f"{2048 / s:.0f} tokens/s, peak allocated {peak / 2 ** 30:.2f} GiB (planned {plan / 2 ** 30:.2f} GiB "
          f"including the CUDA context and slack allowance)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="tiny,base")
    ap.add_argument("--layers", type=int, default=2, help="layers of the base-width model")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--gpu-8b", action="store_true")
    args = ap.parse_args(argv)
    import openmoe  # noqa: F401

    print(describe_machine())
    if args.gpu_8b:
        gpu_8b(args)
    else:
        cpu_table(args)


if __name__ == "__main__":
    main()
