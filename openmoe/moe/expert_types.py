"""Expert sets for the general MoE layer, besides OpenMoE's own (experts.OpenMoeExperts).

Every expert set has the same contract as OpenMoeExperts: forward(x_NH sorted by expert,
counts_E) -> y_NH, and shard_(lo, hi) keeps experts [lo, hi) only (expert parallelism).

  SwiGLUExperts   silu(x @ w_gate) * (x @ w_up) @ w_down           (Llama / Mixtral / Qwen)
  MLPExperts      act(x @ w_in + b_in) -> dropout -> @ w_out + b_out (GPT-2 / BERT / ViT)
  ModuleExperts   E copies of any user nn.Module, run one by one (correct, slower)

The stacked ones write their math once, `ffn(x, linear)`, against a `linear(x, weight, bias)`
whose matmul is either one grouped GEMM over all experts' rows or a plain per-expert loop
(experts.loop_mm): the loop is the reference, and the two cannot drift apart.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .experts import (StackedWeights, compute_dtype, expert_of_rows, group_offsets, grouped_mm,
                      grouped_mm_available, loop_mm, resolve_implementation)

EXPERT_IMPLEMENTATIONS = ("auto", "grouped_mm", "eager")


def activation(name_or_fn: str | Callable) -> Callable:
    """An activation by HF name (gelu, gelu_new, relu, silu, ...) or any callable."""
    if callable(name_or_fn):
        return name_or_fn
    from transformers.activations import ACT2FN

    if name_or_fn not in ACT2FN:
        raise ValueError(f"activation {name_or_fn!r} is unknown; use a callable or one of {sorted(ACT2FN)}")
    return ACT2FN[name_or_fn]


class StackedExperts(StackedWeights):
    """Stacked experts whose math is written once: subclasses name the stacks in `stacked` and
    write `ffn`, run as grouped GEMMs or as the per-expert loop."""

    def __init__(self, num_experts: int, implementation: str = "auto"):
        super().__init__()
        if implementation not in EXPERT_IMPLEMENTATIONS:
            raise ValueError(f"experts implementation {implementation!r}: choose one of {EXPERT_IMPLEMENTATIONS}")
        self.num_experts = num_experts
        self.implementation = implementation

    def ffn(self, x: torch.Tensor, linear: Callable) -> torch.Tensor:
        raise NotImplementedError

    def _matrices(self) -> list[torch.Tensor]:
        return [getattr(self, n) for n in self.stacked if getattr(self, n).dim() == 3]

    def forward(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        dt = compute_dtype(x_NH, self._matrices()[0])
        impl = resolve_implementation(self.implementation, x_NH, dt)
        if impl == "grouped_mm" and grouped_mm_available(x_NH, *self._matrices(), dtype=dt):
            offs = group_offsets(counts_E)

            def mm(x, w):
                return grouped_mm(x, w, offs)
        else:  # the per-expert loop: the reference
            counts = counts_E.tolist()

            def mm(x, w):
                return loop_mm(x, w.to(dt), counts)

        rows = {}

        def linear(x, w_name, b_name=None):
            y = mm(x, getattr(self, w_name))
            if b_name is not None:  # each row gets its own expert's bias
                if "expert_N" not in rows:
                    rows["expert_N"] = expert_of_rows(counts_E, x.shape[0])
                # rows past the experts' (dropped assignments) index a zero row: their gradient,
                # unwritten memory from the kernels, must not reach any expert's bias
                b = getattr(self, b_name).to(y.dtype)
                y = y + torch.cat([b, b.new_zeros(1, b.shape[1])])[rows["expert_N"]]
            return y

        return self.ffn(x_NH, linear)



class SwiGLUExperts(StackedExperts):
    """silu(x @ w_gate) * (x @ w_up) @ w_down, per expert; w_gate, w_up [E, H, I], w_down [E, I, H]."""

    stacked = ("w_gate", "w_up", "w_down")

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 implementation: str = "auto", dropout: float = 0.0):
        super().__init__(num_experts, implementation)
        E, H, I = num_experts, hidden_size, intermediate_size
        self.w_gate = nn.Parameter(torch.empty(E, H, I))
        self.w_up = nn.Parameter(torch.empty(E, H, I))
        self.w_down = nn.Parameter(torch.empty(E, I, H))
        self.dropout = dropout
        self.reset_parameters()

    def ffn(self, x, linear):
        h = F.silu(linear(x, "w_gate")) * linear(x, "w_up")
        return linear(F.dropout(h, self.dropout, self.training), "w_down")


class MLPExperts(StackedExperts):
    """act(x @ w_in + b_in) -> dropout -> @ w_out + b_out, per expert (the two-layer FFN of
    GPT-2 / BERT / ViT); w_in [E, H, I], w_out [E, I, H], biases [E, I] and [E, H] if bias."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 activation_fn: str | Callable = "gelu", bias: bool = True, dropout: float = 0.0,
                 implementation: str = "auto"):
        super().__init__(num_experts, implementation)
        E, H, I = num_experts, hidden_size, intermediate_size
        self.w_in = nn.Parameter(torch.empty(E, H, I))
        self.w_out = nn.Parameter(torch.empty(E, I, H))
        self.stacked = ("w_in", "w_out")
        if bias:
            self.b_in = nn.Parameter(torch.empty(E, I))
            self.b_out = nn.Parameter(torch.empty(E, H))
            self.stacked = ("w_in", "b_in", "w_out", "b_out")
        self.bias = bias
        self.act = activation(activation_fn)
        self.dropout = dropout
        self.reset_parameters()

    def ffn(self, x, linear):
        h = self.act(linear(x, "w_in", "b_in" if self.bias else None))
        return linear(F.dropout(h, self.dropout, self.training), "w_out", "b_out" if self.bias else None)


class ModuleExperts(nn.Module):
    """E instances of a user module (`factory()` called E times), each mapping [n, H] -> [n, H].
    Run one after another on their tokens: any module works, at the price of E small calls."""

    def __init__(self, factory: Callable[[], nn.Module], num_experts: int, hidden_size: int):
        super().__init__()
        mods = []
        for i in range(num_experts):
            m = factory()
            if not isinstance(m, nn.Module):
                raise ValueError(f"experts factory returned {type(m).__name__}, not an nn.Module")
            mods.append(m)
        self.experts = nn.ModuleList(mods)
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self._check_shapes()

    def _check_shapes(self) -> None:
        p = next(self.experts[0].parameters(), None)
        if p is not None and p.device.type == "meta":
            return
        probe = torch.zeros(2, self.hidden_size, device=p.device if p is not None else "cpu",
                            dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
        with torch.no_grad():
            try:
                out = self.experts[0](probe)
            except Exception as err:  # say which argument is wrong, keep the cause
                raise ValueError(f"experts factory: {type(self.experts[0]).__name__} fails on a "
                                 f"[2, hidden_size={self.hidden_size}] input: {err}") from err
        self._check_out(out, probe)

    def _check_out(self, out, x) -> None:
        if not torch.is_tensor(out) or out.shape != x.shape:
            shape = list(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ValueError(f"experts factory: {type(self.experts[0]).__name__} maps {list(x.shape)} -> "
                             f"{shape}; an expert must map [n, hidden_size] -> [n, hidden_size]")

    def forward(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # Any module, any shapes: needs the counts on the host (one sync per layer on a GPU).
        outs, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            if n == 0:
                continue
            xe = x_NH[start:start + n]
            y = self.experts[e](xe)
            self._check_out(y, xe)
            outs.append(y)
            start += n
        if start < x_NH.shape[0]:  # rows of dropped assignments (the dispatcher ignores them)
            outs.append(x_NH.new_zeros(x_NH.shape[0] - start, x_NH.shape[1]))
        return torch.cat(outs)

    def shard_(self, lo: int, hi: int) -> None:
        self.experts = nn.ModuleList(list(self.experts)[lo:hi])
        for p in self.experts.parameters():
            p._ep_expert = True
        self.num_experts = hi - lo

    def stacked_parameters(self) -> list[nn.Parameter]:
        raise ValueError("ModuleExperts hold separate modules, not stacked weights: moving experts "
                         "(load balancing) and the gathered layout need a built-in expert type")


def build_experts(experts, num_experts: int, hidden_size: int, intermediate_size: int | None,
                  activation_fn: str | Callable = "gelu", bias: bool = True, dropout: float = 0.0,
                  implementation: str = "auto") -> nn.Module:
    """`experts` is "openmoe" | "swiglu" | "mlp" (intermediate size default 4 x hidden) | a factory
    of one expert module."""
    from .experts import OpenMoeExperts

    if isinstance(experts, str):
        if intermediate_size is None:
            intermediate_size = 4 * hidden_size
        if experts == "openmoe":
            ex = OpenMoeExperts(num_experts, hidden_size, intermediate_size, implementation)
            ex.reset_parameters()  # torch.empty otherwise; OpenMoE models re-init in _init_weights
            return ex
        if experts == "swiglu":
            return SwiGLUExperts(num_experts, hidden_size, intermediate_size, implementation, dropout)
        if experts == "mlp":
            return MLPExperts(num_experts, hidden_size, intermediate_size, activation_fn, bias, dropout,
                              implementation)
        raise ValueError(f"experts={experts!r}: choose 'openmoe', 'swiglu', 'mlp' or pass a factory "
                         "(a callable returning one expert nn.Module)")
    if isinstance(experts, nn.Module):
        raise ValueError("experts= takes a factory (e.g. lambda: MyFFN()), not a module instance: "
                         "each of the num_experts experts needs its own weights")
    if callable(experts):
        return ModuleExperts(experts, num_experts, hidden_size)
    raise ValueError(f"experts={experts!r}: choose 'openmoe', 'swiglu', 'mlp' or pass a factory")
