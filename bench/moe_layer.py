"""Forward+backward of one MoE layer at OpenMoE-base shapes, against a dense gated MLP of the same
active FLOPs and HF transformers' Mixtral sparse MoE block (grouped_mm and eager), in one run.

    python bench/moe_layer.py [--preset base|8b] [--tokens 4096] [--dtypes float32,bfloat16] [--iters 3]
        [--impls grouped_mm,eager] [--policies dropless,t5x] [--compile] [--max-seconds S]

Reports seconds, GFLOP/s (model FLOPs: 3 x forward GEMM FLOPs of the kept assignments),
ratios to the dense layer and, per FLOP, to HF Mixtral's grouped_mm block, and the fraction of a
measured matmul peak. Each row is printed as soon as it is measured. Results go to
docs/benchmarks.md by hand, with the command line. --preset 8b: OpenMoE-8B widths (H 2048,
I 8192, E 32, top-2, 16384 tokens); explicit shape flags override the preset.

    python bench/moe_layer.py --suite general [--capacity-factor 1.25]

The general layer against DeepSpeed's MoE (deepspeed.moe.layer.MoE, ep_size=1), with the
GPT-2/BERT/ViT two-layer FFN expert (Linear -> GELU -> Linear, biases) at the same shapes:
ours with the built-in experts="mlp" (grouped_mm and eager) and with a user-module expert
(experts=lambda: TwoLayerFFN(H, I)), DeepSpeed, and a dense TwoLayerFFN(H, k*I) of equal active
FLOPs; once dropless (DeepSpeed drop_tokens=False) and once with a capacity factor. DeepSpeed is
an optional bench extra: see requirements-bench.txt; without it its rows are skipped.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import cpu_info, describe_machine, matmul_peak, retain_freed_memory, timeit  # noqa: E402

from openmoe.moe import CapacityPolicy, MoELayer  # noqa: E402
from openmoe.moe.expert_types import MLPExperts, ModuleExperts  # noqa: E402
from openmoe.moe.router import colossalai_capacity  # noqa: E402
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


PRESETS = {  # shape defaults; explicit flags win
    "base": dict(tokens=4096, hidden=768, intermediate=2048, experts=16, top_k=2),
    "8b": dict(tokens=16384, hidden=2048, intermediate=8192, experts=32, top_k=2),
}
IMPLS = ("grouped_mm", "eager")
POLICIES = ("dropless", "t5x")


def _csv(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(choices)}")
        return items
    return parse


def error_line(err: BaseException) -> str:
    """One table cell for a failed row: 'Type: message' (torch's 'Set TORCHDYNAMO_VERBOSE' advice
    left out) and, for the innermost cause, the last frame 'file:line in function'."""
    skip = ("TORCHDYNAMO_VERBOSE", "TORCH_LOGS", "You can suppress this exception")
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not any(k in ln for k in skip)]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    inner = err
    for _ in range(8):  # InductorError keeps the original in inner_exception
        nxt = inner.__cause__ or getattr(inner, "inner_exception", None)
        if nxt is None or nxt is inner:
            break
        inner = nxt
    where = ""
    if inner.__traceback__ is not None:
        f = traceback.extract_tb(inner.__traceback__)[-1]
        where = f" (at {os.path.basename(f.filename)}:{f.lineno} in {f.name})"
    return f"{type(err).__name__}: {text[:240]}{where}".replace("|", "/")


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measured_peak(dtype, device) -> tuple[float, int]:
    """Max GEMM GFLOP/s over square sizes (n = 2048, 3072, and 4096, 8192 on CUDA) and the n."""
    sizes = (2048, 3072, 4096, 8192) if torch.device(device).type == "cuda" else (2048, 3072)
    best = max((matmul_peak(dtype, device, n=n), n) for n in sizes)
    free_memory()
    return best


def tf32_state() -> str:
    prec = getattr(torch.backends.cuda.matmul, "fp32_precision", "n/a")  # torch >= 2.9
    return (f"tf32: torch.backends.cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
            f"float32_matmul_precision={torch.get_float32_matmul_precision()}, matmul.fp32_precision={prec}")


def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=tuple(PRESETS), default="base")
    preset = pre.parse_known_args(argv)[0].preset
    ap = argparse.ArgumentParser(
        description="Forward+backward of one MoE layer (training mode) against dense and library peers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--suite", choices=("openmoe", "general", "all"), default="openmoe",
                    help="openmoe: OpenMoE's gated-MLP layer vs a dense gated MLP and HF Mixtral's block "
                         "(the docs/benchmarks.md table); general: the general layer with a two-layer "
                         "GELU FFN expert (built-in 'mlp' and a user module) vs DeepSpeed's MoE and a "
                         "dense FFN; all: both")
    ap.add_argument("--preset", choices=tuple(PRESETS), default="base",
                    help="shape defaults: base = OpenMoE-base (H 768, I 2048, E 16, 4096 tokens); "
                         "8b = OpenMoE-8B (H 2048, I 8192, E 32, 16384 tokens); shape flags override")
    ap.add_argument("--tokens", type=int, help="tokens T per call (one [1, T, H] batch)")
    ap.add_argument("--hidden", type=int, help="hidden size H")
    ap.add_argument("--intermediate", type=int, help="expert intermediate size I")
    ap.add_argument("--experts", type=int, help="number of experts E")
    ap.add_argument("--top-k", type=int, help="experts per token (the general suite needs 2: "
                                               "DeepSpeed's top-2 gate)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    ap.add_argument("--impls", type=_csv(IMPLS), default=list(IMPLS),
                    help="openmoe suite: expert implementations for our layer and HF Mixtral's block")
    ap.add_argument("--policies", type=_csv(POLICIES), default=list(POLICIES),
                    help="openmoe suite: capacity policies of our layer")
    ap.add_argument("--compile", action="store_true",
                    help="openmoe suite: also each policy's grouped_mm layer under torch.compile(fullgraph=True) "
                         "(the warm-up call compiles)")
    ap.add_argument("--max-seconds", type=float, default=0,
                    help="openmoe suite: start no further row after this many seconds (0: no limit)")
    ap.add_argument("--iters", type=int, default=3, help="timed fwd+bwd calls (median), after one warm-up")
    ap.add_argument("--capacity-factor", type=float, default=1.25,
                    help="general suite: the capacity case, ours capacity=CF (ColossalAI rule) vs "
                         "DeepSpeed capacity_factor=CF, drop_tokens=True (besides the dropless case)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-retain", action="store_true",
                    help="leave glibc's allocator as it is (train.py keeps freed CPU memory for reuse)")
    ap.set_defaults(**PRESETS[preset])
    args = ap.parse_args(argv)
    args.start = time.perf_counter()
    T, H, I, E, K = args.tokens, args.hidden, args.intermediate, args.experts, args.top_k
    print(describe_machine(), flush=True)
    retained = args.device == "cpu" and not args.no_retain and retain_freed_memory()
    print(f"allocator: {'freed memory kept for reuse, as train.py does (every row)' if retained else 'default'}")
    if torch.device(args.device).type == "cuda":
        print(tf32_state())
    print(f"shapes (preset {args.preset}): tokens {T}, H {H}, I {I}, E {E}, top-{K}, device {args.device}\n",
          flush=True)
    if args.suite in ("openmoe", "all"):
        openmoe_suite(args)
    if args.suite in ("general", "all"):
        general_suite(args)


def openmoe_suite(args):
    T, H, I, E, K = args.tokens, args.hidden, args.intermediate, args.experts, args.top_k
    dev = args.device
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    def build(make, dtype):
        with torch.device(dev):  # initialise on the device: an 8B-width layer is GBs of weights
            return _init(make()).to(dev, dtype)

    def openmoe_layer(policy, impl):
        return MoELayer(H, E, K, experts="openmoe", intermediate_size=I, capacity=CapacityPolicy(policy),
                        experts_implementation=impl)

    def mixtral_block(impl):
        cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
        cfg._experts_implementation = impl
        return MixtralSparseMoeBlock(cfg)

    gemm_moe = 2 * T * K * 4 * H * I  # gate (2I) + up (I) + down (I): 4HI MACs per assignment
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        if dtype == torch.bfloat16 and dev == "cpu" and not cpu_info()["native_bf16"]:
            print(f"{dname}: skipped (no native bf16 on this CPU: bf16 matmul would run ~400x slower)\n")
            continue
        peak, peak_n = measured_peak(dtype, dev)
        print(f"{dname}: measured matmul peak {peak:.1f} GFLOP/s (best square GEMM, n={peak_n})", flush=True)
        print("| layer | s / fwd+bwd | GFLOP/s | x dense time | % of peak | x HF Mixtral grouped_mm per FLOP |")
        print("|---|---|---|---|---|---|", flush=True)
        x = torch.randn(1, T, H, device=dev, dtype=dtype, requires_grad=True)
        ref = {}  # "dense": seconds, "mixtral": GFLOP/s

        # (name, builder, call, FLOPs: None = count the kept assignments of the built layer, compile?)
        plan = [("dense gated MLP (I x k)", lambda: OpenMoeMLP(H, K * I), lambda m, x: m(x), 3 * gemm_moe, False)]
        # Mixtral's SwiGLU expert is 3HI MACs (ours is 4HI): FLOPs counted for its own shape.
        # grouped_mm first: the per-FLOP reference of every later row.
        plan += [(f"HF Mixtral block {impl}", lambda impl=impl: mixtral_block(impl), lambda m, x: m(x),
                  3 * 2 * T * K * 3 * H * I, False) for impl in args.impls]
        for policy in args.policies:
            plan += [(f"openmoe {policy} {impl}", lambda p=policy, i=impl: openmoe_layer(p, i),
                      lambda m, x: m(x)[0], None, False) for impl in args.impls]
            if args.compile:
                plan.append((f"openmoe {policy} grouped_mm compiled",
                             lambda p=policy: openmoe_layer(p, "grouped_mm"), lambda m, x: m(x)[0], None, True))

        for name, make, call, flops, compiled in plan:
            if args.max_seconds and time.perf_counter() - args.start > args.max_seconds:
                print(f"| {name} | not run: --max-seconds {args.max_seconds:g} spent | | | | |", flush=True)
                continue
            module = None
            try:
                module = build(make, dtype).train()
                if flops is None:
                    with torch.no_grad():
                        kept = module(x.detach())[1].tokens_per_expert.sum().item()
                    flops = 3 * 2 * kept * 4 * H * I
                runner = module
                if compiled:
                    torch._dynamo.reset()
                    runner = torch.compile(module, fullgraph=True)
                s = timeit(fwd_bwd(runner, x, call), 1, args.iters)
            except Exception as err:  # noqa: BLE001 - one failed row must not end a scarce GPU run
                what = "compile failed" if compiled else "failed"
                print(f"| {name} | {what}: {error_line(err)} | | | | |", flush=True)
                del module
                x.grad = None
                free_memory()
                continue
            g = flops / s / 1e9
            if name.startswith("dense"):
                ref["dense"] = s
            if name == "HF Mixtral block grouped_mm":
                ref["mixtral"] = g
            vs_dense = f"{s / ref['dense']:.2f}" if "dense" in ref else "-"
            vs_mix = f"{g / ref['mixtral']:.2f}" if "mixtral" in ref else "-"
            print(f"| {name} | {s:.4f} | {g:.1f} | {vs_dense} | {100 * g / peak:.0f}% | {vs_mix} |", flush=True)
            del module, runner
            x.grad = None
            free_memory()
        if args.compile:
            torch._dynamo.reset()
        print(flush=True)


class TwoLayerFFN(nn.Module):
    """Linear -> GELU -> Linear (biases): the FFN of GPT-2 / BERT / ViT; one expert, or the dense peer."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


DEEPSPEED_INSTALL = ("pip install --no-deps -r requirements-bench.txt (see its header; --no-deps keeps "
                     "pip away from the pinned torch)")


def load_deepspeed_moe(device: str):
    """deepspeed.moe.layer.MoE, or (None, why). On CPU DS_ACCELERATOR=cpu picks DeepSpeed's CPU
    accelerator up front (no oneCCL / IPEX needed for a single-process ep_size=1 layer)."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.moe.layer import MoE
    except Exception as err:  # not installed, or an install that cannot import here
        return None, f"{type(err).__name__}: {err}"
    return MoE, None


def _load_reference(layer, gate_EH, ffns):
    """Give any of the layers the same router and expert weights (same routing, same math)."""
    with torch.no_grad():
        if hasattr(layer, "deepspeed_moe"):  # DeepSpeed MoE
            layer.deepspeed_moe.gate.wg.weight.copy_(gate_EH)
            for mod, ref in zip(layer.deepspeed_moe.experts.deepspeed_experts, ffns):
                mod.load_state_dict(ref.state_dict())
            return layer
        layer.gate_weight.copy_(gate_EH)
        experts = layer.experts
        if isinstance(experts, ModuleExperts):
            for mod, ref in zip(experts.experts, ffns):
                mod.load_state_dict(ref.state_dict())
        elif isinstance(experts, MLPExperts):  # x @ w_in[e]: the transposed nn.Linear weight
            for e, ref in enumerate(ffns):
                experts.w_in[e].copy_(ref.fc1.weight.t())
                experts.b_in[e].copy_(ref.fc1.bias)
                experts.w_out[e].copy_(ref.fc2.weight.t())
                experts.b_out[e].copy_(ref.fc2.bias)
        else:
            raise TypeError(type(experts).__name__)
    return layer


def _parity(label, name, layer, x, y, ds_idx_KT, y_ds) -> str:
    """Same kept assignments as DeepSpeed? Outputs equal (fp32)? With drops, DeepSpeed renormalises
    the top-2 weights over the kept assignments (a token that loses its 2nd expert gets weight 1 on
    its 1st), ours before the drop (as Mixtral/Qwen do): compare the tokens that lost nothing."""
    with torch.no_grad():
        r = layer.route(x.detach())
    ours_TK = torch.where(r.keep_TK, r.expert_TK, -1)
    same = torch.equal(ours_TK.cpu(), ds_idx_KT.t().to(torch.long).cpu())
    full_T = r.keep_TK.all(dim=1)
    diff = (y - y_ds).reshape(-1, y.shape[-1])[full_T].abs().max().item() if full_T.any() else 0.0
    where = "" if bool(full_T.all()) else f" on the {int(full_T.sum())} tokens that kept both experts"
    return (f"{label}, {name}: kept assignments {'identical to' if same else 'DIFFER from'} DeepSpeed's; "
            f"max |ours - deepspeed|{where} = {diff:.1e}")


def general_suite(args):
    """Our general MoELayer with a two-layer GELU FFN expert vs DeepSpeed's MoE, same shapes and
    weights, training mode, fwd+bwd; both against a dense TwoLayerFFN(H, k*I)."""
    T, H, I, E, K = args.tokens, args.hidden, args.intermediate, args.experts, args.top_k
    cf, dev = args.capacity_factor, args.device
    print(f"== general layer vs DeepSpeed MoE: expert Linear(H,I) -> GELU -> Linear(I,H), biases; "
          f"top-{K}, capacity factor {cf} ==")
    if K != 2:
        print(f"skipped: --top-k {K}; DeepSpeed's MoE layer is compared at top-2 (its k=2 gate)\n")
        return
    MoE, why = load_deepspeed_moe(dev)
    if MoE is None:
        print(f"DeepSpeed rows skipped: deepspeed is not importable ({why}).\n"
              f"  install it with: {DEEPSPEED_INSTALL}")
    else:
        import deepspeed
        print(f"deepspeed {deepspeed.__version__}: MoE(ep_size=1, k=2, min_capacity=4, use_residual=False, "
              "top2_2nd_expert_sampling=False), no process group")
    print("ours: MoELayer(experts='mlp' | lambda: TwoLayerFFN(H, I), activation='gelu', bias=True, "
          "norm_topk_prob=True); DeepSpeed renormalises the top-2 weights and, with its 2nd-expert "
          "sampling off, picks the same top-2: same routing and outputs at equal weights.")
    print("expert rows: rows the expert FFNs run. Ours: the kept assignments. DeepSpeed: E x capacity, "
          "padding included (dropless: capacity = the busiest expert's count).\n")

    torch.manual_seed(0)
    gate_EH = torch.randn(E, H) * 0.02
    ffns = [_init(TwoLayerFFN(H, I)) for _ in range(E)]
    cases = (("dropless", "dropless", False), (f"cf {cf}", cf, True))

    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        if dtype == torch.bfloat16 and dev == "cpu" and not cpu_info()["native_bf16"]:
            print(f"{dname}: skipped (no native bf16 on this CPU: bf16 matmul would run ~400x slower)\n")
            continue
        x = torch.randn(1, T, H, device=dev, dtype=dtype, requires_grad=True)
        rows, checks = [], []  # (layer, capacity, seconds, expert rows, dropped, deepspeed key)

        dense = _init(TwoLayerFFN(H, K * I)).to(dev, dtype)
        rows.append(("dense FFN (I x k)", "-", timeit(fwd_bwd(dense, x, lambda m, x: m(x)), 1, args.iters),
                     "-", "-", None))
        for label, capacity, drop in cases:
            variants = [(f"ours mlp {impl}", dict(experts="mlp", intermediate_size=I, activation="gelu",
                                                   bias=True, experts_implementation=impl))
                        for impl in ("grouped_mm", "eager")]
            variants.append(("ours module TwoLayerFFN", dict(experts=lambda: TwoLayerFFN(H, I))))
            y_ds = None
            if MoE is not None:
                ds = MoE(hidden_size=H, expert=TwoLayerFFN(H, I), num_experts=E, ep_size=1, k=2,
                         capacity_factor=cf, eval_capacity_factor=cf, min_capacity=4, drop_tokens=drop,
                         use_residual=False, top2_2nd_expert_sampling=False)
                ds = _load_reference(ds, gate_EH, ffns).to(dev, dtype).train()
                with torch.no_grad():
                    y_ds = ds(x.detach())[0]
                    _, C, _, idx, _, _, _ = ds.deepspeed_moe.gate(x.detach().reshape(-1, H), None, True)
                kept, ds_idx = int((idx >= 0).sum()), idx
                s = timeit(fwd_bwd(ds, x, lambda m, x: m(x)[0]), 1, args.iters)
                rows.append(("DeepSpeed MoE", f"{label} (drop_tokens={drop})", s, E * int(C),
                             1 - kept / (T * K), label))
                if drop:
                    checks.append(f"capacity per expert at cf {cf}: DeepSpeed max(ceil(k*cf*T/E), 4) = {int(C)}, "
                                  f"ours (ColossalAI) max(even(floor(k*cf*T/E)), 4) = "
                                  f"{colossalai_capacity(T, E, K, cf, 4)}")
            for name, kw in variants:
                layer = MoELayer(H, E, K, capacity=capacity, norm_topk_prob=True, **kw)
                layer = _load_reference(layer, gate_EH, ffns).to(dev, dtype).train()
                with torch.no_grad():
                    y, out = layer(x.detach())
                if y_ds is not None and dtype == torch.float32:
                    checks.append(_parity(label, name, layer, x, y, ds_idx, y_ds))
                s = timeit(fwd_bwd(layer, x, lambda m, x: m(x)[0]), 1, args.iters)
                rows.append((name, label, s, int(out.tokens_per_expert.sum()), float(out.dropped_fraction),
                             label))

        t_dense = rows[0][2]
        t_ds = {r[5]: r[2] for r in rows if r[0] == "DeepSpeed MoE"}
        print(f"{dname}: tokens {T}, H {H}, I {I}, E {E}, top-{K}, training fwd+bwd")
        print("| layer | capacity | s / fwd+bwd | x dense time | ours / deepspeed | expert rows | dropped |")
        print("|---|---|---|---|---|---|---|")
        for name, cap, s, n_rows, dropped, key in rows:
            vs_ds = "-" if key not in t_ds or name == "DeepSpeed MoE" else f"{s / t_ds[key]:.2f}"
            dropped = dropped if isinstance(dropped, str) else f"{100 * dropped:.1f}%"
            print(f"| {name} | {cap} | {s:.4f} | {s / t_dense:.2f} | {vs_ds} | {n_rows} | {dropped} |")
        if MoE is None:
            print("| DeepSpeed MoE | - | skipped (not installed: see above) | - | - | - | - |")
        for line in checks:
            print(f"  {line}")
        print()


if __name__ == "__main__":
    main()
