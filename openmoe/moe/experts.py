"""Experts: stacked weights and the backends that run them over expert-contiguous tokens.

OpenMoE's expert is the three-way gated MLP (docs/openmoe-numerics.md, section 2):
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

from .kernels import compute_dtype, grouped_mm, grouped_mm_fn  # noqa: F401 (re-exported)


def gated_mlp(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The OpenMoE gate: x @ W_gate is 2I wide; first half times silu(second half) times up."""
    a, b = gate.chunk(2, dim=-1)
    return a * F.silu(b) * up


def group_offsets(counts_E: torch.Tensor) -> torch.Tensor:
    """grouped_mm's offsets: where each expert's rows end (int32, on the counts' device)."""
    return torch.cumsum(counts_E, 0, dtype=torch.int32)


def expert_of_rows(counts_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Expert id of each of num_rows expert-sorted rows, with static shapes (repeat_interleave
    would need the counts on the host). Rows past the last expert's get E: they are dropped
    assignments, which belong to no expert."""
    rows = torch.arange(num_rows, device=counts_E.device, dtype=torch.int32)
    return torch.searchsorted(group_offsets(counts_E), rows, right=True)


def experts_grouped_mm(experts: "OpenMoeExperts", x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    offs = group_offsets(counts_E)
    h = gated_mlp(grouped_mm(x_NH, experts.wi_gate, offs), grouped_mm(x_NH, experts.wi_up, offs))
    return grouped_mm(h, experts.wo, offs)


class _LoopMM(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e]: one torch.mm per expert in both passes, written into
    preallocated outputs. The plain per-expert matmul (the reference), without the costs of
    writing it with autograd: per-expert pieces to concatenate, and a weight gradient stacked
    back from per-expert slices (measured: those copies were ~20% of a bf16 training step)."""

    @staticmethod
    def forward(ctx, x_NI, w_EIO, counts):
        y_NO = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[-1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(x_NI[start:start + n], w_EIO[e], out=y_NO[start:start + n])
                start += n
        # keep only what the backward needs (a frozen stack, as under LoRA, needs no saved x)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x_NI if need_w else None, w_EIO if need_x else None)
        ctx.shapes = (x_NI.shape, w_EIO.shape, x_NI.dtype, x_NI.device)
        ctx.counts = counts
        return y_NO

    @staticmethod
    def backward(ctx, g_NO):
        x_NI, w_EIO = ctx.saved_tensors
        x_shape, w_shape, dtype, device = ctx.shapes
        g_NO = g_NO.contiguous()
        gx = torch.empty(x_shape, dtype=dtype, device=device) if ctx.needs_input_grad[0] else None
        gw = torch.empty(w_shape, dtype=dtype, device=device) if ctx.needs_input_grad[1] else None
        start = 0
        for e, n in enumerate(ctx.counts):
            rows = slice(start, start + n)
            if gx is not None and n:
                torch.mm(g_NO[rows], w_EIO[e].t(), out=gx[rows])
            if gw is not None:
                if n:
                    torch.mm(x_NI[rows].t(), g_NO[rows], out=gw[e])
                else:
                    gw[e].zero_()
            start += n
        return gx, gw, None


def loop_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of x (sorted by expert, counts[e] rows for expert e) times their expert's matrix, in
    the dtype of w (cast the stack once: one cast, one gradient cast back)."""
    return _LoopMM.apply(x_NI.to(w_EIO.dtype).contiguous(), w_EIO, counts)


def experts_eager(experts: "OpenMoeExperts", x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    counts = counts_E.tolist()  # one host sync for the whole layer
    dt = compute_dtype(x_NH, experts.wi_gate)

    def mm(x, w):
        return loop_mm(x, w.to(dt), counts)

    return mm(gated_mlp(mm(x_NH, experts.wi_gate), mm(x_NH, experts.wi_up)), experts.wo)


EXPERT_BACKENDS: dict[str, Callable] = {"eager": experts_eager, "grouped_mm": experts_grouped_mm}


def register_expert_backend(name: str, fn: Callable) -> None:
    """Add a backend: fn(experts_module, x_NH sorted by expert, counts_E) -> y_NH."""
    EXPERT_BACKENDS[name] = fn


def grouped_mm_available(x: torch.Tensor, *weights: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """The kernel exists for this device, and every operand's rows are 16-byte aligned (its
    requirement: hidden and intermediate sizes that are multiples of 8 for bf16, 4 for fp32)."""
    if grouped_mm_fn() is None:
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
    training step (docs/benchmarks.md, "Expert kernels"): on CPU the per-expert loop is 12-30%
    faster in bf16 (torch's CPU grouped_mm bf16 backward is slow), within the noise in fp32; on
    CUDA grouped_mm is one kernel. Same math either way (the loop is the reference).
    Under torch.compile "auto" is always grouped_mm: the loop needs the counts on the host (a
    graph break and a sync), grouped_mm takes them as a device tensor (moe/kernels.py)."""
    if name != "auto":
        return name
    if torch.compiler.is_compiling():
        return "grouped_mm"
    if x.device.type == "cpu" and compute in (torch.bfloat16, torch.float16):
        return "eager"
    return "grouped_mm"


class StackedWeights(nn.Module):
    """Experts whose weights are [E, ...] stacks named in `stacked` (matrices [E, in, out], biases
    [E, out]): what expert parallelism shards, the balancer moves and the gathered layout
    all-gathers."""

    stacked: tuple[str, ...] = ()

    def stacked_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self.stacked]

    def shard_(self, lo: int, hi: int) -> None:
        shard_stacked_(self, lo, hi)

    def reset_parameters(self, std: float = 0.02) -> None:
        for p in self.stacked_parameters():
            if p.dim() == 3:
                nn.init.normal_(p, std=std)
            else:
                nn.init.zeros_(p)


class OpenMoeExperts(StackedWeights):
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
