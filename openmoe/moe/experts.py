"""Experts: stacked weights and the backends that run them over expert-contiguous tokens.

OpenMoE's expert is the three-way gated MLP of the reference (section 2):
    a, b = split(x @ wi_gate, 2);  y = (a * silu(b) * (x @ wi_up)) @ wo
with wi_gate [E, H, 2I], wi_up [E, H, I], wo [E, I, H] (the T5X / ColossalAI layout, used as
x @ W[e] with no transpose, so checkpoints load as they are).

Backends get tokens already sorted by expert plus the count per expert ("auto", the default,
picks one per device and dtype: resolve_implementation):
  eager       a plain loop over experts: the reference, and the path for any dtype/device.
  grouped_mm  torch.nn.functional.grouped_mm (or torch._grouped_mm): one kernel per projection.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def gated_mlp(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The OpenMoE gate: x @ W_gate is 2I wide; first half times silu(second half) times up."""
    a, b = gate.chunk(2, dim=-1)
    return a * F.silu(b) * up


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # grouped_mm's CPU backward rejects expanded (stride-0) gradients, e.g. from .sum().
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def _grouped_mm_fn() -> Callable | None:
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def compute_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """grouped_mm is not autocast-aware: under autocast use its dtype (as torch.matmul would),
    else the weights' dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return w.dtype


def grouped_mm(x_NH: torch.Tensor, w_EHO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    fn = _grouped_mm_fn()
    dt = compute_dtype(x_NH, w_EHO)
    return _contiguous_grad(fn(x_NH.to(dt), w_EHO.to(dt), offs=offs_E))


def experts_grouped_mm(experts: "OpenMoeExperts", x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    offs = torch.cumsum(counts_E, 0).to(torch.int32)
    h = gated_mlp(grouped_mm(x_NH, experts.wi_gate, offs), grouped_mm(x_NH, experts.wi_up, offs))
    return grouped_mm(h, experts.wo, offs)


def experts_eager(experts: "OpenMoeExperts", x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    # unbind once: indexing W[e] per expert would make backward allocate a full [E, ...]
    # gradient for every expert.
    wg, wu, wo = experts.wi_gate.unbind(0), experts.wi_up.unbind(0), experts.wo.unbind(0)
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):  # one host sync for the whole loop
        if n == 0:
            continue
        xe = x_NH[start:start + n].to(wg[e].dtype)
        outs.append(gated_mlp(xe @ wg[e], xe @ wu[e]) @ wo[e])
        start += n
    if not outs:
        return x_NH.new_zeros(0, experts.wo.shape[-1], dtype=experts.wo.dtype)
    return torch.cat(outs)


EXPERT_BACKENDS: dict[str, Callable] = {"eager": experts_eager, "grouped_mm": experts_grouped_mm}


def register_expert_backend(name: str, fn: Callable) -> None:
    """Add a backend: fn(experts_module, x_NH sorted by expert, counts_E) -> y_NH."""
    EXPERT_BACKENDS[name] = fn


def grouped_mm_available(x: torch.Tensor, *weights: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """The kernel exists for this device, and every operand's rows are 16-byte aligned (its
    requirement: hidden and intermediate sizes that are multiples of 8 for bf16, 4 for fp32)."""
    if _grouped_mm_fn() is None:
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    if x.device.type not in ("cpu", "cuda"):
        return False
    size = (dtype or weights[0].dtype).itemsize
    dims = [x.shape[-1]] + [d for w in weights for d in w.shape[-2:]]
    return all(d * size % 16 == 0 for d in dims)


def shard_stacked_(experts: nn.Module, lo: int, hi: int) -> None:
    """Keep experts [lo, hi) of every stack named in `experts.stacked` (expert parallelism); the
    kept parameters are marked as experts (`_ep_expert`)."""
    for name in experts.stacked:
        full = getattr(experts, name)
        local = nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad)
        local._ep_expert = True
        setattr(experts, name, local)
    experts.num_experts = hi - lo


def resolve_implementation(name: str, x: torch.Tensor, compute: torch.dtype) -> str:
    """"auto" -> the faster kernel for this device and dtype, as measured on a whole OpenMoE
    training step (docs/benchmarks.md, "Expert kernels"): on CPU the per-expert loop is 13-28%
    faster in bf16 (torch's CPU grouped_mm bf16 backward is slow) and ~7% slower in fp32; on
    CUDA grouped_mm is one kernel. Same math either way (the loop is the reference)."""
    if name != "auto":
        return name
    if x.device.type == "cpu" and compute in (torch.bfloat16, torch.float16):
        return "eager"
    return "grouped_mm"


class OpenMoeExperts(nn.Module):
    """E gated MLPs as stacked weights. forward(x sorted by expert, tokens per expert)."""

    stacked = ("wi_gate", "wi_up", "wo")

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 implementation: str = "auto"):
        super().__init__()
        E, H, I = num_experts, hidden_size, intermediate_size
        self.num_experts = E
        self.wi_gate = nn.Parameter(torch.empty(E, H, 2 * I))
        self.wi_up = nn.Parameter(torch.empty(E, H, I))
        self.wo = nn.Parameter(torch.empty(E, I, H))
        self.implementation = implementation

    def forward(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        dt = compute_dtype(x_NH, self.wi_gate)
        name = resolve_implementation(self.implementation, x_NH, dt)
        if name not in EXPERT_BACKENDS:
            raise ValueError(f"unknown experts implementation {name!r}; have {sorted(EXPERT_BACKENDS)} or 'auto'")
        if name == "grouped_mm" and not grouped_mm_available(x_NH, self.wi_gate, self.wi_up, self.wo, dtype=dt):
            # Same math, another kernel: the loop is the reference implementation.
            name = "eager"
        return EXPERT_BACKENDS[name](self, x_NH, counts_E)

    def reset_parameters(self, std: float = 0.02) -> None:
        for p in self.stacked_parameters():
            nn.init.normal_(p, std=std)

    def stacked_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self.stacked]

    def shard_(self, lo: int, hi: int) -> None:
        shard_stacked_(self, lo, hi)
