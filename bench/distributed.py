"""Training-step time under expert parallelism on CPU ranks (gloo), with a breakdown, against
one rank on the same global batch, and against HF transformers' own expert parallelism
(`DistributedConfig(ep_size=...)` on Mixtral) at matched shapes.

    python bench/distributed.py [--ranks 1,2,4] [--layers 2] [--seq 256] [--global-batch 4]
    python bench/distributed.py --exchange [--ranks 2,4] [--tokens 1024] [--layers 2]

--exchange times the EP exchange variants instead (set_ep_exchange): MoE layers alone, forward +
backward, plain vs chunked overlap vs hierarchical (at 4 ranks: 2 "nodes" x 2), NCCL when there
is a GPU per rank, else gloo on CPU; ratios to plain from the same launch.

Each layout runs in its own torchrun launch of this file (`--worker`). Breakdown per step:
  attention  forward+backward of the attention blocks (timed by module hooks around forward,
             backward estimated as 2x forward, as for the GEMMs)
  experts    expert GEMMs (same estimate)
  dense MLP  OpenMoE's extra dense MLP after each MoE layer (same estimate; Mixtral has none)
  all2all    time inside the dispatch/combine exchanges (launch + wait), forward and backward (measured)
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
    timed_exchanges(timers.t)
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
    t = {k: v / args.steps for k, v in timers.t.items()}
    # forward GEMM-bound parts: backward costs about twice the forward
    res = {"step": total, "attention": 3 * t.get("attention", 0.0), "experts": 3 * t.get("experts", 0.0),
           "dense_mlp": 3 * t.get("dense_mlp", 0.0),
           "all2all": t.get("all2all", 0.0), "reduce": t.get("reduce", 0.0)}
    res["other"] = max(0.0, total - sum(v for k, v in res.items() if k != "step"))
    vals = torch.tensor([res[k] for k in sorted(res)], dtype=torch.float64)
    if ps.distributed:
        dist.all_reduce(vals, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    if ps.is_main:
        with open(args.out, "w") as f:
            json.dump(dict(zip(sorted(res), vals.tolist())), f)


def timed_exchanges(t: dict) -> None:
    """Add the time spent launching and waiting for EP exchanges (both directions) to t["all2all"]."""
    from openmoe.parallel import a2a

    for cls, name in ((a2a.Route, "start"), (a2a.Pending, "wait"), (a2a._HierarchicalPending, "wait")):
        orig = cls.__dict__[name]

        def timed(self, *a, _orig=orig, **k):
            s = time.perf_counter()
            out = _orig(self, *a, **k)
            t["all2all"] += time.perf_counter() - s
            return out

        setattr(cls, name, timed)


VARIANTS = [("plain", 1, None), ("overlap 2 chunks", 2, None), ("overlap 4 chunks", 4, None),
            ("hierarchical 2x2", 1, 2), ("hierarchical 2x2 + 2 chunks", 2, 2)]


def exchange_worker(args) -> None:
    """MoE layers alone under EP = world: forward + backward per variant, rounds interleaved so
    drift hits every variant alike; median per variant, the slowest rank's."""
    import torch.distributed as dist

    from openmoe.moe import MoELayer
    from openmoe.parallel.expert_parallel import set_ep_exchange, shard_experts

    world = int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.device_count() >= world
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(
        MoELayer(args.hidden, args.experts, 2, experts="swiglu", intermediate_size=args.intermediate,
                 capacity="t5x", experts_implementation="grouped_mm") for _ in range(args.layers)).to(device, dtype)
    for layer in layers:
        shard_experts(layer, dist.group.WORLD)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
    variants = [v for v in VARIANTS if v[2] is None or world == 4]
    times = {name: [] for name, _, _ in variants}

    def step():
        h = x.requires_grad_()
        for layer in layers:
            h = h + layer(h)[0]
        h.float().square().mean().backward()

    options = {}  # each variant's settings, made once (a hierarchical one creates process groups)
    for name, chunks, per_node in variants:
        set_ep_exchange(layers, chunks, per_node is not None, per_node)
        options[name] = layers[0].dispatcher.options
    for r in range(args.steps + 1):
        for name, _, _ in variants:
            for layer in layers:
                layer.dispatcher.options = options[name]
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            s = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - s)
    med = torch.tensor([sorted(v)[len(v) // 2] for v in times.values()], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"backend": dist.get_backend(), "times": dict(zip(times, med.tolist()))}, f)
    dist.destroy_process_group()


def exchange_main(args) -> None:
    from common import describe_machine

    print(describe_machine())
    print(f"MoE layers alone: {args.layers} x (H {args.hidden}, I {args.intermediate}, E {args.experts} top-2, t5x), "
          f"{args.tokens} tokens per rank, forward + backward, median of {args.steps}, slowest rank\n")
    print("| ranks | backend | variant | s/iter | vs plain |")
    print("|---|---|---|---|---|")
    load0 = _load()
    for n in [int(x) for x in (args.ranks or "2,4").split(",")]:
        out = tempfile.mktemp(suffix=".json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), __file__,
               "--worker", "exchange", "--out", out] + [f"--{k}={getattr(args, k)}" for k in
                                                        ("layers", "tokens", "hidden", "intermediate", "experts", "steps")]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // n)))
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if not os.path.exists(out):
            print(f"| {n} | failed: {r.stderr[-300:]} |")
            continue
        res = json.load(open(out))
        plain = res["times"]["plain"]
        for name, t in res["times"].items():
            print(f"| {n} | {res['backend']} | {name} | {t:.3f} | {t / plain:.2f}x |", flush=True)
    # a shared machine: the load around the launches says how much the figures can be trusted
    print(f"\nload average (1, 5, 15 min) before: {load0}, after: {_load()}")


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


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
    ap.add_argument("--ranks", default=None, help="default 1,2,4 (--exchange: 2,4)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", choices=["openmoe", "hf", "exchange"])
    ap.add_argument("--exchange", action="store_true", help="time the EP exchange variants (plain/overlap/hierarchical)")
    ap.add_argument("--tokens", type=int, default=1024, help="--exchange: tokens per rank")
    ap.add_argument("--hidden", type=int, default=512, help="--exchange: hidden size")
    ap.add_argument("--intermediate", type=int, default=1024, help="--exchange: expert intermediate size")
    ap.add_argument("--experts", type=int, default=8, help="--exchange: experts")
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.worker == "openmoe":
        return worker(args)
    if args.worker == "hf":
        return hf_worker(args)
    if args.worker == "exchange":
        return exchange_worker(args)
    if args.exchange:
        return exchange_main(args)

    from common import describe_machine

    print(describe_machine())
    print(f"shapes: {args.layers} layers (all MoE), H 768, I 2048, E 16 top-2, t5x routing, global batch "
          f"{args.global_batch} x {args.seq}, gloo on CPU, OMP threads 2/ranks\n")
    print("| layout | s/step | attention | experts | extra dense MLP | all2all | reduce | other | HF Mixtral EP s/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = None
    for n in [int(x) for x in (args.ranks or "1,2,4").split(",")]:
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
