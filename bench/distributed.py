"""Training-step time under expert parallelism on CPU ranks (gloo), with a breakdown, against
one rank on the same global batch, and against HF transformers' own expert parallelism
(`DistributedConfig(ep_size=...)` on Mixtral) at matched shapes.

    python bench/distributed.py [--ranks 1,2,4] [--layers 2] [--seq 256] [--global-batch 4]

Each layout runs in its own torchrun launch of this file (`--worker`). Breakdown per step:
  attention  forward+backward of the attention blocks (timed by module hooks around forward,
             backward estimated as 2x forward, as for the GEMMs)
  experts    expert GEMMs (same estimate)
  dense MLP  OpenMoE's extra dense MLP after each MoE layer (same estimate; Mixtral has none)
  all2all    the dispatch/combine exchanges, forward and backward (measured)
  reduce     gradient reduction and clipping (measured)
  other      the rest of the step (routing, norms, embedding, lm_head, optimizer)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(__file__))
ROOT = os.path.join(os.path.dirname(__file__), "..")


class Timers:
    def __init__(self):
        self.t = defaultdict(float)

    def wrap_forward(self, module, key):
        orig = module.forward

        def fwd(*a, **k):
            s = time.perf_counter()
            out = orig(*a, **k)
            self.t[key] += time.perf_counter() - s
            return out

        module.forward = fwd


def worker(args) -> None:
    import torch.distributed as dist

    import openmoe  # noqa: F401
    from openmoe import OpenMoeConfig, OpenMoeForCausalLM
    from openmoe.parallel import clip_grad_norm, init_distributed, parallelize, sync_gradients
    from openmoe.parallel import expert_parallel as epmod

    ps = init_distributed(args.ep)
    torch.manual_seed(0)
    cfg = OpenMoeConfig(vocab_size=8192, num_hidden_layers=args.layers, moe_layer_interval=1,
                        capacity_policy="t5x")
    model = parallelize(OpenMoeForCausalLM(cfg).train(), ps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    timers = Timers()
    for layer in model.model.layers:
        timers.wrap_forward(layer.self_attn, "attention")
        timers.wrap_forward(layer.mlp.experts, "experts")
        if hasattr(layer, "extra_mlp"):
            timers.wrap_forward(layer.extra_mlp, "dense_mlp")
    a2a_orig = epmod.a2a

    def timed_a2a(*a, **k):  # forward exchange; its backward is another a2a, timed by autograd hook
        s = time.perf_counter()
        out = a2a_orig(*a, **k)
        timers.t["all2all"] += time.perf_counter() - s
        if out.requires_grad:
            out.register_hook(lambda g: timers.t.__setitem__("a2a_bwd_marks", timers.t["a2a_bwd_marks"] + 1))
        return out

    epmod.a2a = timed_a2a
    bs = args.global_batch // ps.world
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(2, cfg.vocab_size, (args.global_batch, args.seq), generator=g) for _ in range(args.steps + 1)]

    def step(ids):
        local = ids[ps.rank * bs:(ps.rank + 1) * bs]
        out = model(input_ids=local, labels=local, use_cache=False)
        out.loss.backward()
        s = time.perf_counter()
        sync_gradients(model, ps)
        clip_grad_norm(model, 1.0, ps)
        timers.t["reduce"] += time.perf_counter() - s
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up
    timers.t.clear()
    if ps.distributed:
        dist.barrier()
    s = time.perf_counter()
    for ids in batches[1:]:
        step(ids)
    total = (time.perf_counter() - s) / args.steps
    t = {k: v / args.steps for k, v in timers.t.items() if k != "a2a_bwd_marks"}
    # forward GEMM-bound parts: backward costs about twice the forward
    res = {"step": total, "attention": 3 * t.get("attention", 0.0), "experts": 3 * t.get("experts", 0.0),
           "dense_mlp": 3 * t.get("dense_mlp", 0.0),
           "all2all": 2 * t.get("all2all", 0.0), "reduce": t.get("reduce", 0.0)}
    res["other"] = max(0.0, total - sum(v for k, v in res.items() if k != "step"))
    vals = torch.tensor([res[k] for k in sorted(res)], dtype=torch.float64)
    if ps.distributed:
        dist.all_reduce(vals, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    if ps.is_main:
        with open(args.out, "w") as f:
            json.dump(dict(zip(sorted(res), vals.tolist())), f)


def hf_worker(args) -> None:
    """HF Mixtral with DistributedConfig(ep_size): forward+backward step time, or the error."""
    import torch.distributed as dist
    from transformers import MixtralConfig, MixtralForCausalLM

    result = {}
    try:
        from transformers.distributed import DistributedConfig

        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = MixtralConfig(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=args.layers,
                            num_attention_heads=12, num_key_value_heads=12, head_dim=64, num_local_experts=16,
                            num_experts_per_tok=2)
        tmp = args.out + ".mixtral"
        if int(os.environ.get("RANK", "0")) == 0:
            torch.manual_seed(0)
            MixtralForCausalLM(cfg).save_pretrained(tmp)
        if world > 1:
            dist.init_process_group("gloo")
            dist.barrier()
        kw = {"distributed_config": DistributedConfig(ep_size=world, fsdp_size=world)} if world > 1 else {}
        model = MixtralForCausalLM.from_pretrained(tmp, **kw).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
        bs = args.global_batch // world
        ids = torch.randint(2, 8192, (bs, args.seq))

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        s = time.perf_counter()
        for _ in range(args.steps):
            step()
        result["step"] = (time.perf_counter() - s) / args.steps
    except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
        result["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", choices=["openmoe", "hf"])
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.worker == "openmoe":
        return worker(args)
    if args.worker == "hf":
        return hf_worker(args)

    from common import describe_machine

    print(describe_machine())
    print(f"shapes: {args.layers} layers (all MoE), H 768, I 2048, E 16 top-2, t5x routing, global batch "
          f"{args.global_batch} x {args.seq}, gloo on CPU, OMP threads 2/ranks\n")
    print("| layout | s/step | attention | experts | extra dense MLP | all2all | reduce | other | HF Mixtral EP s/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = None
    for n in [int(x) for x in args.ranks.split(",")]:
        res = {}
        for kind in ("openmoe", "hf"):
            out = tempfile.mktemp(suffix=".json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   __file__, "--worker", kind, "--ep", str(n), "--out", out, "--layers", str(args.layers),
                   "--seq", str(args.seq), "--global-batch", str(args.global_batch), "--steps", str(args.steps)]
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, 2 // n)))
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            res[kind] = json.load(open(out)) if os.path.exists(out) else {"error": r.stderr[-300:]}
        o, h = res["openmoe"], res["hf"]
        if "step" not in o:
            print(f"| {n} rank(s), ep {n} | failed: {o.get('error')} |")
            continue
        base = base or o["step"]
        hf = f"{h['step']:.2f}" if "step" in h else f"n/a ({h.get('error', '?')[:80]})"
        print(f"| {n} rank(s), ep {n} | {o['step']:.2f} ({o['step'] / base:.2f}x) | {o['attention']:.2f} | "
              f"{o['experts']:.2f} | {o['dense_mlp']:.2f} | {o['all2all']:.3f} | {o['reduce']:.3f} | {o['other']:.2f} | "
              f"{hf} |", flush=True)


if __name__ == "__main__":
    main()
