"""The expert sets of the MoE layer: forward(x_NH sorted by expert, counts_E) -> y_NH, and
shard_(lo, hi) keeps experts [lo, hi) only (expert parallelism).

  OpenMoeExperts  (a * silu(b) * (x @ wi_up)) @ wo, a, b = split(x @ wi_gate)   (OpenMoE's own)
  SwiGLUExperts   silu(x @ w_gate) * (x @ w_up) @ w_down           (Llama / Mixtral / Qwen)
  GatedExperts    act(x @ w_gate) * (x @ w_up) @ w_down, any act   (GeGLU; sparse upcycling)
  MLPExperts      act(x @ w_in + b_in) -> dropout -> @ w_out + b_out (GPT-2 / BERT / ViT)
  ModuleExperts   E copies of any user nn.Module, run one by one (correct, slower)

The stacked ones (StackedExperts) write their math once, `ffn(x, linear)`, against a
`linear(x, weight, bias)` whose matmul is the kernel moe/kernels.py chooses: one grouped GEMM over
all experts' rows, or the per-expert loop (the reference), so the two cannot drift apart.
`build_experts` makes one from the name MoELayer's `experts=` takes (EXPERT_TYPES).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import (EXPERT_BACKENDS, check_implementation, choose_kernel, compute_dtype, expert_of_rows,
                      group_offsets, grouped_mm, loop_mm)


def activation(name_or_fn: str | Callable) -> Callable:
    """An activation by HF name (gelu, gelu_new, relu, silu, ...) or any callable."""
    if callable(name_or_fn):
        return name_or_fn
    from transformers.activations import ACT2FN

    if name_or_fn not in ACT2FN:
        raise ValueError(f"activation {name_or_fn!r} is unknown; use a callable or one of {sorted(ACT2FN)}")
    return ACT2FN[name_or_fn]


def gated_mlp(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The OpenMoE gate: x @ W_gate is 2I wide; first half times silu(second half) times up."""
    a, b = gate.chunk(2, dim=-1)
    return a * F.silu(b) * up


def shard_stacked_(experts: nn.Module, lo: int, hi: int) -> None:
    """Keep experts [lo, hi) of every stack named in `experts.stacked` (expert parallelism); the
    kept parameters are marked as experts (`_ep_expert`)."""
    for name in experts.stacked:
        full = getattr(experts, name)
        local = nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad)
        local._ep_expert = True
        setattr(experts, name, local)
    experts.num_experts = hi - lo


class StackedExperts(nn.Module):
    """Experts whose weights are [E, ...] stacks named in `stacked` (matrices [E, in, out], biases
    [E, out]): what expert parallelism shards, the balancer moves and the gathered layout
    all-gathers. Subclasses write `ffn` once; `implementation` names what runs it
    (moe/kernels.py: "auto", a kernel, or a registered backend)."""

    stacked: tuple[str, ...] = ()

    def __init__(self, num_experts: int, implementation: str = "auto"):
        super().__init__()
        check_implementation(implementation)
        self.num_experts = num_experts
        self.implementation = implementation

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

    def ffn(self, x: torch.Tensor, linear: Callable) -> torch.Tensor:
        raise NotImplementedError

    def _matrices(self) -> list[torch.Tensor]:
        stacks = (getattr(self, n) for n in self.stacked)
        return [w for w in stacks if w.dim() == 3]

    def forward(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        mats = self._matrices()
        dt = compute_dtype(x_NH, mats[0])
        name = choose_kernel(self.implementation, x_NH, mats, dt)
        if name not in EXPERT_BACKENDS:  # set after construction to a name never registered
            check_implementation(name)
        return EXPERT_BACKENDS[name](self, x_NH, counts_E)

    def run_kernel(self, kernel: str, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """`ffn` with every matmul by `kernel` ("grouped_mm" or "eager"), as chosen by forward."""
        dt = compute_dtype(x_NH, self._matrices()[0])
        if kernel == "grouped_mm":
            offs = group_offsets(counts_E)

            def mm(x, w):
                return grouped_mm(x, w, offs)
        else:  # the per-expert loop: the reference
            counts = counts_E.tolist()  # one host sync for the whole layer

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


class OpenMoeExperts(StackedExperts):
    """OpenMoE's expert, the three-way gated MLP (docs/openmoe-numerics.md, section 2):
        a, b = split(x @ wi_gate, 2);  y = (a * silu(b) * (x @ wi_up)) @ wo
    with wi_gate [E, H, 2I], wi_up [E, H, I], wo [E, I, H] (the T5X / ColossalAI layout, used as
    x @ W[e] with no transpose, so checkpoints load as they are). Left uninitialized (the model's
    _init_weights or a checkpoint fills it)."""

    stacked = ("wi_gate", "wi_up", "wo")

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 implementation: str = "auto"):
        super().__init__(num_experts, implementation)
        E, H, I = num_experts, hidden_size, intermediate_size
        self.wi_gate = nn.Parameter(torch.empty(E, H, 2 * I))
        self.wi_up = nn.Parameter(torch.empty(E, H, I))
        self.wo = nn.Parameter(torch.empty(E, I, H))

    def ffn(self, x, linear):
        return linear(gated_mlp(linear(x, "wi_gate"), linear(x, "wi_up")), "wo")


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


class GatedExperts(SwiGLUExperts):
    """act(x @ w_gate) * (x @ w_up) @ w_down with any activation (GeGLU etc.): SwiGLU's stacks and
    parameter names, so checkpoints and expert parallelism treat it the same."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 act: Callable, implementation: str = "auto"):
        super().__init__(num_experts, hidden_size, intermediate_size, implementation)
        self.act = act

    def ffn(self, x, linear):
        return linear(self.act(linear(x, "w_gate")) * linear(x, "w_up"), "w_down")


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


def _openmoe(num_experts, hidden_size, intermediate_size, act, bias, dropout, implementation):
    ex = OpenMoeExperts(num_experts, hidden_size, intermediate_size, implementation)
    ex.reset_parameters()  # torch.empty otherwise; OpenMoE models re-init in _init_weights
    return ex


def _swiglu(num_experts, hidden_size, intermediate_size, act, bias, dropout, implementation):
    return SwiGLUExperts(num_experts, hidden_size, intermediate_size, implementation, dropout)


def _gated(num_experts, hidden_size, intermediate_size, act, bias, dropout, implementation):
    return GatedExperts(num_experts, hidden_size, intermediate_size, activation(act), implementation)


def _mlp(num_experts, hidden_size, intermediate_size, act, bias, dropout, implementation):
    return MLPExperts(num_experts, hidden_size, intermediate_size, act, bias, dropout, implementation)


# experts= name -> builder(num_experts, hidden, intermediate, activation, bias, dropout, implementation)
EXPERT_TYPES: dict[str, Callable[..., StackedExperts]] = {
    "openmoe": _openmoe, "swiglu": _swiglu, "gated": _gated, "mlp": _mlp}


def build_experts(experts, num_experts: int, hidden_size: int, intermediate_size: int | None,
                  activation_fn: str | Callable = "gelu", bias: bool = True, dropout: float = 0.0,
                  implementation: str = "auto") -> nn.Module:
    """`experts` is a name of EXPERT_TYPES (intermediate size default 4 x hidden; `activation_fn`
    for "gated" and "mlp", `bias` for "mlp") or a factory of one expert module."""
    choices = ", ".join(repr(name) for name in EXPERT_TYPES)
    if isinstance(experts, str):
        if experts not in EXPERT_TYPES:
            raise ValueError(f"experts={experts!r}: choose {choices} or pass a factory "
                             "(a callable returning one expert nn.Module)")
        if intermediate_size is None:
            intermediate_size = 4 * hidden_size
        return EXPERT_TYPES[experts](num_experts, hidden_size, intermediate_size, activation_fn, bias, dropout,
                                     implementation)
    if isinstance(experts, nn.Module):
        raise ValueError("experts= takes a factory (e.g. lambda: MyFFN()), not a module instance: "
                         "each of the num_experts experts needs its own weights")
    if callable(experts):
        return ModuleExperts(experts, num_experts, hidden_size)
    raise ValueError(f"experts={experts!r}: choose {choices} or pass a factory")
