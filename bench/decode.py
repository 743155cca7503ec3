"""Decode speed: tokens/s at batch 1 and 8 against the memory-bandwidth bound and HF Mixtral at
matched shapes, plus the share of MoE-layer time spent routing/dispatching (not expert GEMMs).

    python bench/decode.py [--configs tiny,base,8b] [--new-tokens 16] [--batches 1,8]
        [--modes eager,static,compiled] [--device cpu|cuda] [--dtype float32|bfloat16]

Modes: eager (HF's dynamic cache), static (`cache_implementation="static"`), compiled (static
cache and the decode step compiled by `generate` with fullgraph=True; mode "reduce-overhead",
i.e. CUDA graphs, on CUDA). For each, the first `generate` call (cold: compile, kernel choice)
is timed against a later one of the same shape ("first/steady").
Bound: bytes of weights one decode step touches (attention, dense MLPs, lm_head, embedding rows,
and the experts actually selected) / measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import describe_machine  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def copy_bandwidth(device: str = "cpu", n_bytes: int = 1 << 28) -> float:
    a = torch.empty(n_bytes // 4, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    _sync(device)
    t = time.perf_counter()
    for _ in range(3):
        b.copy_(a)
    _sync(device)
    return 2 * n_bytes * 3 / (time.perf_counter() - t)  # read + write


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_bytes(cfg, batch: int) -> int:
    H, I, E, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
    attn = 4 * H * cfg.num_attention_heads * cfg.head_dim
    mlp = 4 * H * I
    n_moe = cfg.num_hidden_layers // cfg.moe_layer_interval
    experts_touched = min(E, k * batch)  # at most k distinct experts per token
    params = (cfg.num_hidden_layers * attn + (cfg.num_hidden_layers - n_moe) * mlp
              + n_moe * (mlp + E * H + experts_touched * mlp) + cfg.vocab_size * H + batch * H)
    return params  # times bytes per element, by the caller


def mode_kwargs(mode: str, device: str) -> dict:
    if mode == "eager":
        return {}
    if mode == "static":
        return dict(cache_implementation="static")
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=True, mode="reduce-overhead" if device == "cuda" else "default")
    cc._compile_all_devices = True  # generate compiles on accelerators only unless told
    return dict(cache_implementation="static", compile_config=cc)


def decode_rate(model, batch: int, new_tokens: int, vocab: int, mode: str = "eager") -> tuple[float, float]:
    """(steady decode tokens/s with the prefill subtracted, first call / steady call time)."""
    device = model.device.type
    ids = torch.randint(2, vocab, (batch, 8), device=model.device)
    ids[:, 0] = 0
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
              **mode_kwargs(mode, device))

    def timed(fn):
        _sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            fn()
        _sync(device)
        return time.perf_counter() - t

    first = timed(lambda: model.generate(ids, **kw))  # cold: compilation, first kernel calls
    total = min(timed(lambda: model.generate(ids, **kw)) for _ in range(2))
    prefill = min(timed(lambda: model(ids)) for _ in range(2))  # prefill alone, subtracted
    return batch * new_tokens / max(total - prefill, 1e-9), first / total


def moe_overhead(layer, batch: int, iters: int = 20) -> tuple[float, float]:
    """Seconds per call: whole MoE layer vs its expert GEMMs alone, at decode (batch tokens)."""
    x = torch.randn(batch, 1, layer.gate_weight.shape[1])
    with torch.no_grad():
        layer(x)
        t = time.perf_counter()
        for _ in range(iters):
            layer(x)
        whole = (time.perf_counter() - t) / iters
        r = layer.route(x)
        plan = layer.dispatcher.plan(r, layer.num_experts)
        xs, counts = layer.dispatcher.dispatch(x.reshape(-1, x.shape[-1]), plan)
        t = time.perf_counter()
        for _ in range(iters):
            layer.experts(xs, counts)
        gemm = (time.perf_counter() - t) / iters
    return whole, gemm


def _mixtral(cfg, device, dtype):
    from transformers import MixtralConfig, MixtralForCausalLM

    mcfg = MixtralConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                         num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
                         head_dim=cfg.head_dim, num_local_experts=cfg.num_experts, num_experts_per_tok=2,
                         max_position_embeddings=cfg.max_position_embeddings)
    with torch.device(device):
        return MixtralForCausalLM(mcfg).to(dtype).eval()  # every layer MoE: more expert bytes per step


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="tiny,base")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--modes", default="eager,static,compiled")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--no-mixtral", action="store_true")
    args = ap.parse_args(argv)
    import openmoe  # noqa: F401
    from openmoe import OpenMoeConfig, OpenMoeForCausalLM

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    print(describe_machine())
    bw = copy_bandwidth(args.device)
    print(f"measured copy bandwidth: {bw / 1e9:.1f} GB/s | {dtype} | new tokens {args.new_tokens}\n")
    print("| config | batch | mode | openmoe tok/s | bound tok/s | % of bound | first/steady | "
          "HF Mixtral tok/s (eager) | MoE layer: routing+dispatch share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        cfg = OpenMoeConfig.from_pretrained(os.path.join(ROOT, "configs", name))
        torch.manual_seed(0)
        with torch.device(args.device):
            model = OpenMoeForCausalLM(cfg).to(dtype).eval()
        moe = next(l.mlp for l in model.model.layers if l.is_moe)
        theirs = {}
        if not args.no_mixtral:
            mixtral = _mixtral(cfg, args.device, dtype)
            theirs = {b: decode_rate(mixtral, b, args.new_tokens, cfg.vocab_size)[0]
                      for b in [int(x) for x in args.batches.split(",")]}
            del mixtral
        for b in [int(x) for x in args.batches.split(",")]:
            bound = b * bw / (step_bytes(cfg, b) * dtype.itemsize)
            whole, gemm = moe_overhead(moe, b) if args.device == "cpu" else (float("nan"), float("nan"))
            for mode in args.modes.split(","):
                try:
                    ours, first = decode_rate(model, b, args.new_tokens, cfg.vocab_size, mode)
                except Exception as e:  # noqa: BLE001  (one failing mode must not hide the others)
                    print(f"| {name} | {b} | {mode} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} |")
                    continue
                print(f"| {name} | {b} | {mode} | {ours:.1f} | {bound:.1f} | {100 * ours / bound:.0f}% | "
                      f"{first:.1f}x | {theirs.get(b, float('nan')):.1f} | "
                      f"{100 * (whole - gemm) / whole:.0f}% of {whole * 1e3:.2f} ms |", flush=True)
        del model


if __name__ == "__main__":
    main()
