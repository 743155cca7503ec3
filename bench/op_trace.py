"""The aten ops a forward + backward of OpenMoE runs, as a digest: compare two checkouts to show
that a refactor changed no kernel, shape or dtype (so no benchmark can move but for Python
overhead, which the launch-bound line below times).

    python bench/op_trace.py                  # in each checkout; equal digests = the same ops
    python bench/op_trace.py --dump ops.json  # the op lists themselves, to diff

Cases: capacity policies t5x and dropless x expert kernels grouped_mm and eager, 2 MoE layers at
H 256, E 8, top-2, one [2, 64] batch, fp32 on CPU. Each op is recorded as its name and the
shapes and dtypes of its tensor arguments (TorchDispatchMode), in call order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(__file__))
from common import describe_machine  # noqa: E402

from openmoe import OpenMoeConfig, OpenMoeForCausalLM  # noqa: E402


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.ops.append(" ".join([str(func)] + [f"{tuple(t.shape)}:{t.dtype}" for t in tensors]))
        return func(*args, **kwargs)


def model(policy: str, impl: str, width: int = 256, experts: int = 8) -> OpenMoeForCausalLM:
    torch.manual_seed(0)
    cfg = OpenMoeConfig(vocab_size=1000, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                        num_attention_heads=4, head_dim=width // 4, num_experts=experts, num_experts_per_tok=2,
                        moe_layer_interval=1, capacity_policy=policy, experts_implementation_name=impl)
    return OpenMoeForCausalLM(cfg).train()


def trace(policy: str, impl: str) -> dict:
    m = model(policy, impl)
    ids = torch.randint(2, 1000, (2, 64), generator=torch.Generator().manual_seed(1))
    with OpLog() as log:
        out = m(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
    grad = sum(p.grad.double().abs().sum().item() for p in m.parameters() if p.grad is not None)
    return {"ops": log.ops, "loss": out.loss.item(), "grad_abs_sum": grad}


def launch_bound_ms(policy: str, reps: int = 200) -> float:
    """Best fwd+bwd time of a tiny model (H 32): Python and dispatch overhead, not FLOPs."""
    torch.manual_seed(0)
    cfg = OpenMoeConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                        num_attention_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                        moe_layer_interval=1, capacity_policy=policy)
    m, ids = OpenMoeForCausalLM(cfg).train(), torch.randint(2, 100, (2, 16))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        m(ids, labels=ids).loss.backward()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", help="write the op lists to this JSON file")
    ap.add_argument("--no-timing", action="store_true", help="skip the launch-bound timing")
    args = ap.parse_args(argv)
    print(describe_machine())
    torch.set_num_threads(1)
    dump = {}
    for policy in ("t5x", "dropless"):
        for impl in ("grouped_mm", "eager"):
            r = trace(policy, impl)
            digest = hashlib.sha256("\n".join(r["ops"]).encode()).hexdigest()[:16]
            print(f"{policy:9s} {impl:10s} {len(r['ops']):5d} ops  digest {digest}  loss {r['loss']!r}  "
                  f"sum|grad| {r['grad_abs_sum']!r}", flush=True)
            dump[f"{policy}/{impl}"] = r
    if not args.no_timing:
        print("launch-bound fwd+bwd (tiny model, best of 200, 1 thread): "
              + ", ".join(f"{p} {launch_bound_ms(p):.3f} ms" for p in ("t5x", "dropless")))
    if args.dump:
        with open(args.dump, "w") as f:
            json.dump(dump, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
