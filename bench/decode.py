"""Decode speed: tokens/s at batch 1 and 8 against the memory-bandwidth bound and HF Mixtral at
matched shapes, plus the share of MoE-layer time spent routing/dispatching (not expert GEMMs).

    python bench/decode.py [--configs tiny,base] [--new-tokens 16] [--batches 1,8]

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


def copy_bandwidth(n_bytes: int = 1 << 28) -> float:
    a = torch.empty(n_bytes // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    t = time.perf_counter()
    for _ in range(3):
        b.copy_(a)
    return 2 * n_bytes * 3 / (time.perf_counter() - t)  # read + write


def step_bytes(cfg, batch: int) -> int:
    H, I, E, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
    attn = 4 * H * cfg.num_attention_heads * cfg.head_dim
    mlp = 4 * H * I
    n_moe = cfg.num_hidden_layers // cfg.moe_layer_interval
    experts_touched = min(E, k * batch)  # at most k distinct experts per token
    params = (cfg.num_hidden_layers * attn + (cfg.num_hidden_layers - n_moe) * mlp
              + n_moe * (mlp + E * H + experts_touched * mlp) + cfg.vocab_size * H + batch * H)
    return 4 * params


def decode_rate(model, batch: int, new_tokens: int, vocab: int) -> float:
    ids = torch.randint(2, vocab, (batch, 8))
    ids[:, 0] = 0
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(ids, **dict(kw, max_new_tokens=2, min_new_tokens=2))  # warm-up
    t = time.perf_counter()
    model.generate(ids, **kw)
    total = time.perf_counter() - t
    t = time.perf_counter()
    model(ids)  # prefill alone, subtracted
    prefill = time.perf_counter() - t
    return batch * new_tokens / max(total - prefill, 1e-9)


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


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="tiny,base")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    import openmoe  # noqa: F401
    from openmoe import OpenMoeConfig, OpenMoeForCausalLM
    from transformers import MixtralConfig, MixtralForCausalLM

    print(describe_machine())
    bw = copy_bandwidth()
    print(f"measured copy bandwidth: {bw / 1e9:.1f} GB/s\n")
    print("| config | batch | openmoe tok/s | bound tok/s | % of bound | HF Mixtral tok/s | MoE layer: routing+dispatch share |")
    print("|---|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        cfg = OpenMoeConfig.from_pretrained(os.path.join(ROOT, "configs", name))
        torch.manual_seed(0)
        model = OpenMoeForCausalLM(cfg).eval()
        mcfg = MixtralConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                             intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                             num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
                             head_dim=cfg.head_dim, num_local_experts=cfg.num_experts, num_experts_per_tok=2,
                             max_position_embeddings=cfg.max_position_embeddings)
        mixtral = MixtralForCausalLM(mcfg).eval()  # every layer MoE: more expert bytes per step
        moe = next(l.mlp for l in model.model.layers if l.is_moe)
        for b in [int(x) for x in args.batches.split(",")]:
            ours = decode_rate(model, b, args.new_tokens, cfg.vocab_size)
            theirs = decode_rate(mixtral, b, args.new_tokens, cfg.vocab_size)
            bound = b * bw / step_bytes(cfg, b)
            whole, gemm = moe_overhead(moe, b)
            print(f"| {name} | {b} | {ours:.1f} | {bound:.1f} | {100 * ours / bound:.0f}% | {theirs:.1f} | "
                  f"{100 * (whole - gemm) / whole:.0f}% of {whole * 1e3:.2f} ms |", flush=True)
        del model, mixtral


if __name__ == "__main__":
    main()
