"""Training-step speed: tokens/s and MFU of OpenMoE against HF transformers' Mixtral
(experts_implementation grouped_mm) at matched widths, in one run.

    python bench/train_step.py [--preset base|8b] [--layers N] [--seq S] [--batch B] [--vocab V]
        [--dtypes ...] [--policies t5x,dropless] [--compile] [--no-mixtral] [--peak-tflops P]
        [--max-seconds S] [--iters 3]

--preset base (default): OpenMoE-base widths (H 768, I 2048, 12 x 64 heads, E 16, top-2) with
fewer layers (4) and a smaller vocabulary (32000) so a step fits a laptop CPU; OpenMoE has MoE
every 2nd layer here (plus the extra dense MLP). --preset 8b: configs/8b/config.json (H 2048,
I 8192, 24 x 128 heads, E 32, top-2, vocab 256384, MoE every 6th layer as in the file) with 6
layers, batch 4 x seq 2048; Mixtral at the same widths. Any shape flag overrides the preset.

Mixtral has MoE in every layer: each model's MFU uses its own FLOPs per token (6 x active
parameters + attention), against the same measured matmul peak (and --peak-tflops, if given).
OpenMoE does more work per token than Mixtral at equal widths (its gate projection is 2I wide,
then the gated activation halves it: four H x I matrices per MLP to Mixtral's three), so the
last column (FLOP/s, i.e. tokens/s x FLOPs per token) is the equal-work comparison.

Models are built on the device and freed before the next is built. On CUDA a model whose fp32
weights, gradients and AdamW states (16 bytes a parameter) would take over 60% of the GPU's
memory is not built; for Mixtral the layer count is lowered until it fits (printed), so with
the 8b preset on one 141 GB H200 Mixtral runs fewer layers than OpenMoE and only the FLOP/s
column compares like with like.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import cpu_info, describe_machine, matmul_peak, retain_freed_memory, timeit  # noqa: E402
from moe_layer import error_line, free_memory, tf32_state  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {  # defaults; explicit flags win
    "base": dict(layers=4, seq=512, batch=2, vocab=32000),
    "8b": dict(layers=6, seq=2048, batch=4, vocab=None),  # vocab None: the config's (256384)
}
POLICIES = ("t5x", "dropless")
MEMORY_FRACTION = 0.6  # of the GPU, for 16 bytes a parameter; the rest for activations and logits


def mixtral_flops_per_token(model, seq):
    cfg = model.config
    act = 0
    for n, p in model.named_parameters():
        if n.startswith("model.embed_tokens"):
            continue
        act += p.numel() * cfg.num_experts_per_tok // cfg.num_local_experts if ".experts." in n else p.numel()
    return 6 * act + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq


def _n_params(model_cls, cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in model_cls(cfg).parameters())


def _policies(text):
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or any(t not in POLICIES for t in items):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(POLICIES)}")
    return items


def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=tuple(PRESETS), default="base")
    preset = pre.parse_known_args(argv)[0].preset
    ap = argparse.ArgumentParser(description="Training-step tokens/s and MFU, OpenMoE vs HF Mixtral.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", choices=tuple(PRESETS), default="base",
                    help="base: OpenMoE-base widths, 4 layers, vocab 32000, 2 x 512 tokens; "
                         "8b: configs/8b widths and vocab, 6 layers, 4 x 2048 tokens")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--vocab", type=int, help="default: 32000 (base), the config's 256384 (8b)")
    ap.add_argument("--moe-every", type=int, help="OpenMoE moe_layer_interval (default: 2 base, "
                                                  "the config's 6 for 8b)")
    ap.add_argument("--hidden", type=int, help="override the preset's hidden size (both models)")
    ap.add_argument("--intermediate", type=int, help="override the preset's intermediate size (both models)")
    ap.add_argument("--experts", type=int, help="override the preset's expert count (both models)")
    ap.add_argument("--mixtral-layers", type=int,
                    help="Mixtral's layer count (default: --layers, lowered on CUDA until it fits)")
    ap.add_argument("--iters", type=int, default=3, help="timed steps (median), after one warm-up")
    ap.add_argument("--dtypes", help="autocast dtypes (default: bfloat16 on CUDA, float32,bfloat16 on CPU)")
    ap.add_argument("--policies", type=_policies, default=list(POLICIES), help="OpenMoE capacity policies")
    ap.add_argument("--compile", action="store_true",
                    help="also each OpenMoE model with its decoder layers compiled as train.py's compile: true "
                         "does (the warm-up step compiles)")
    ap.add_argument("--no-mixtral", action="store_true", help="skip the HF Mixtral rows")
    ap.add_argument("--peak-tflops", type=float, help="also MFU against this peak (TFLOP/s), e.g. a datasheet's")
    ap.add_argument("--max-seconds", type=float, default=0,
                    help="start no further row after this many seconds (0: no limit)")
    ap.add_argument("--no-retain", action="store_true",
                    help="leave glibc's allocator as it is (train.py keeps freed CPU memory for reuse)")
    ap.set_defaults(**PRESETS[preset])
    args = ap.parse_args(argv)
    start = time.perf_counter()
    import openmoe  # noqa: F401
    from openmoe import OpenMoeConfig, OpenMoeForCausalLM
    from openmoe.training.metrics import flops_per_token
    from openmoe.training.compile import compile_layers
    from transformers import MixtralConfig, MixtralForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    dtypes = (args.dtypes or ("bfloat16" if cuda else "float32,bfloat16")).split(",")
    print(describe_machine(), flush=True)
    retained = device == "cpu" and not args.no_retain and retain_freed_memory()
    print(f"allocator: {'freed memory kept for reuse, as train.py does (every model)' if retained else 'default'}")
    if cuda:
        print(tf32_state())

    # OpenMoE config: base = the class defaults; 8b = configs/8b/config.json. Overrides on top.
    over = {"hidden_size": args.hidden, "intermediate_size": args.intermediate, "num_experts": args.experts}
    over = {k: v for k, v in over.items() if v is not None}
    if args.preset == "8b":
        base_cfg = OpenMoeConfig.from_pretrained(os.path.join(ROOT, "configs", "8b"))
    else:
        base_cfg = OpenMoeConfig(moe_layer_interval=2)
    vocab = args.vocab or base_cfg.vocab_size
    moe_every = args.moe_every or base_cfg.moe_layer_interval
    H = over.get("hidden_size", base_cfg.hidden_size)
    I = over.get("intermediate_size", base_cfg.intermediate_size)
    E = over.get("num_experts", base_cfg.num_experts)
    heads, head_dim, K = base_cfg.num_attention_heads, base_cfg.head_dim, base_cfg.num_experts_per_tok

    def openmoe_cfg(policy):
        d = base_cfg.to_dict()
        for k in ("architectures", "transformers_version", "model_type"):
            d.pop(k, None)
        d.update(over, vocab_size=vocab, num_hidden_layers=args.layers, moe_layer_interval=moe_every,
                 capacity_policy=policy)
        return OpenMoeConfig(**d)

    def mixtral_cfg(layers):
        c = MixtralConfig(vocab_size=vocab, hidden_size=H, intermediate_size=I, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
                          num_local_experts=E, num_experts_per_tok=K,
                          max_position_embeddings=max(args.seq, 4096))
        c._experts_implementation = "grouped_mm"
        return c

    budget = MEMORY_FRACTION * torch.cuda.get_device_properties(0).total_memory if cuda else None

    def fits(n_params):
        return budget is None or 16 * n_params <= budget

    n_moe = sum(openmoe_cfg(args.policies[0]).is_moe_layer(i) for i in range(args.layers))
    print(f"shapes (preset {args.preset}): layers {args.layers} (OpenMoE: {n_moe} MoE, every {moe_every}), "
          f"H {H}, I {I}, heads {heads}x{head_dim}, E {E} top-{K}, vocab {vocab}, "
          f"batch {args.batch} x seq {args.seq}", flush=True)

    mix_layers = args.mixtral_layers or args.layers
    if not args.no_mixtral and cuda and args.mixtral_layers is None:
        while mix_layers > 1 and not fits(_n_params(MixtralForCausalLM, mixtral_cfg(mix_layers))):
            mix_layers -= 1
        if mix_layers != args.layers:
            print(f"HF Mixtral: {mix_layers} layers (all MoE), not {args.layers}: more would need over "
                  f"{MEMORY_FRACTION:.0%} of the GPU for fp32 weights + grads + AdamW; compare FLOP/s",
                  flush=True)

    peak_col = f" | MFU vs {args.peak_tflops:g} TFLOP/s" if args.peak_tflops else ""
    mem_col = " | peak GiB" if cuda else ""
    print(f"\n| model | dtype | policy | s/step | tokens/s | MFU (measured peak){peak_col} | "
          f"vs HF Mixtral tokens/s | vs HF Mixtral FLOP/s{mem_col} |")
    ncol = 8 + bool(peak_col) + bool(mem_col)
    print("|---" * ncol + "|", flush=True)
    blank = " |" * (ncol - 4)  # after '| model | dtype | policy | message |'

    for dname in dtypes:
        dtype = getattr(torch, dname)
        if dtype == torch.bfloat16 and device == "cpu" and not cpu_info()["native_bf16"]:
            print(f"| - | {dname} | - | skipped: no native bf16 on this CPU |{blank}", flush=True)
            continue
        sizes = (4096, 8192) if cuda else (2048, 3072)
        peak = max(matmul_peak(dtype, device, n=n) for n in sizes) * 1e9
        free_memory()
        print(f"| (measured matmul peak {dname}: {peak / 1e9:.0f} GFLOP/s, best of n={sizes}) |"
              + " |" * (ncol - 1), flush=True)
        torch.manual_seed(0)
        ids = torch.randint(2, vocab, (args.batch, args.seq), device=device)
        ntok = ids.numel()
        ref = None  # Mixtral's (tokens/s, FLOP/s)

        runs = []  # (name, policy, config factory, model class, compile?)
        if not args.no_mixtral:
            runs.append((f"HF Mixtral grouped_mm ({mix_layers} layers)", "dropless",
                         lambda: mixtral_cfg(mix_layers), MixtralForCausalLM, False))
        for policy in args.policies:
            runs.append((f"openmoe {policy}", policy, lambda p=policy: openmoe_cfg(p), OpenMoeForCausalLM,
                         args.compile))

        for name, policy, make_cfg, cls, also_compiled in runs:
            if args.max_seconds and time.perf_counter() - start > args.max_seconds:
                print(f"| {name} | {dname} | {policy} | not run: --max-seconds {args.max_seconds:g} spent |"
                      f"{blank}", flush=True)
                continue
            cfg = make_cfg()
            n_params = _n_params(cls, cfg)
            if not fits(n_params):
                print(f"| {name} | {dname} | {policy} | not run: {n_params / 1e9:.2f}B parameters x 16 bytes "
                      f"> {MEMORY_FRACTION:.0%} of the GPU |{blank}", flush=True)
                continue
            model = opt = variants = runner = None
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                with torch.device(device):  # initialise on the device (an 8b-width model is GBs)
                    model = cls(cfg)
                model.train()
                fpt = (mixtral_flops_per_token(model, args.seq) if cls is MixtralForCausalLM
                       else flops_per_token(model, args.seq))
                # the trainer's optimizer, for both
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
                variants = [(name, model)] + ([(f"{name} compiled", None)] if also_compiled else [])
                for row, runner in variants:
                    if runner is None:  # compiled variant: same model, weights and optimizer
                        if args.max_seconds and time.perf_counter() - start > args.max_seconds:
                            print(f"| {row} | {dname} | {policy} | not run: --max-seconds "
                                  f"{args.max_seconds:g} spent |{blank}", flush=True)
                            continue
                        if cuda:
                            torch.cuda.reset_peak_memory_stats()
                        torch._dynamo.reset()
                        compile_layers(model)  # what train.py's compile: true does (per decoder layer)
                        runner = model
                    try:
                        s = timeit(_step(runner, opt, ids, device, dtype), warmup=1, iters=args.iters)
                    except Exception as err:  # noqa: BLE001 - a failed row must not end a scarce GPU run
                        what = "compile failed" if row.endswith("compiled") else "failed"
                        print(f"| {row} | {dname} | {policy} | {what}: {error_line(err)} |{blank}", flush=True)
                        opt.zero_grad(set_to_none=True)
                        if isinstance(err, torch.OutOfMemoryError):
                            break
                        continue
                    tps = ntok / s
                    if cls is MixtralForCausalLM:
                        ref = (tps, tps * fpt)
                    cells = [row, dname, policy, f"{s:.3f}", f"{tps:.0f}", f"{100 * tps * fpt / peak:.1f}%"]
                    if args.peak_tflops:
                        cells.append(f"{100 * tps * fpt / (args.peak_tflops * 1e12):.1f}%")
                    cells += [f"{tps / ref[0]:.2f}x", f"{tps * fpt / ref[1]:.2f}x"] if ref else ["-", "-"]
                    if cuda:
                        cells.append(f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f}")
                    print("| " + " | ".join(cells) + " |", flush=True)
            except Exception as err:  # noqa: BLE001 - building the model or optimizer failed
                print(f"| {name} | {dname} | {policy} | failed: {error_line(err)} |{blank}", flush=True)
            finally:
                model = opt = variants = runner = None  # drop every reference before the next model
                torch._dynamo.reset()
                free_memory()


def _step(model, opt, ids, device, dtype):
    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


if __name__ == "__main__":
    main()
