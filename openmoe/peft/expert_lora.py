"""LoRA on the stacked expert weights, computed on the grouped-GEMM path.

PEFT's `target_parameters` wraps OpenMoeExperts in lora.ParamWrapper (one per stacked weight,
nested). Left to itself, the wrapper's forward parametrizes the stack as W + s * lhs @ rhs
(lhs [E, in, r], rhs [E, r, out]) for the duration of the call: a second full copy of every
stack (2 GiB per projection for OpenMoE-8B in bf16), built once more by torch's registration
check, kept by autograd for the backward and given a gradient of the same size. Instead, the
outermost wrapper forwards straight to the experts, and this backend takes the two factors from
the wrappers and computes, per expert group of tokens,

    x @ W[e] + s * (x @ lhs[e]) @ rhs[e]

as three grouped GEMMs over the same expert-contiguous rows: the frozen stack is used as it is,
and the extra memory is [tokens, r] per projection. Experts are never unstacked into Linears;
the wrappers stay PEFT's (state dict, adapter format, merge).

The backend is registered under the name "lora" with the project's own extension point
(openmoe.moe.kernels.register_expert_backend) by use_lora_backend, the one call that switches
experts to it (attach_lora, quantize_experts); restore_backend (merge_lora) switches them back.
Which kernel runs each matmul is moe/kernels.py's choice: the experts' own implementation
resolved once, and grouped_mm per matrix only where it takes the shapes.
"""

from __future__ import annotations

import types

import torch

from ..moe.expert_types import gated_mlp
from ..moe.kernels import (choose_kernel, compute_dtype, group_offsets, grouped_mm, loop_mm, register_expert_backend,
                           resolve_implementation)

BACKEND = "lora"
PROJECTIONS = ("wi_gate", "wi_up", "wo")


def factors(experts: torch.nn.Module, name: str) -> list:
    """[(lhs, rhs, scaling)] of the active adapters on stack `name` (empty when none is active,
    the adapters are disabled, or already merged into the weight)."""
    wrapper = getattr(experts, "_lora_wrappers", {}).get(name)
    if wrapper is None or wrapper.disable_adapters or wrapper.merged:
        return []
    out = []
    for adapter in wrapper.active_adapters:
        if adapter in wrapper.lora_A:
            lhs, rhs, scaling = wrapper.get_delta_factors(adapter)
            # small ([E, in, r], [E, r, out]); the kernel wants them dense
            out.append((lhs.contiguous(), rhs.contiguous(), scaling))
    return out


def expert_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor, counts_E: torch.Tensor,
              use_grouped: bool = True) -> torch.Tensor:
    """Rows of x (sorted by expert) times their expert's matrix: one grouped GEMM when asked for
    and the kernel takes these shapes (16-byte aligned rows in w's dtype), else a loop over the
    experts' row blocks."""
    if choose_kernel("grouped_mm" if use_grouped else "eager", x_NI, [w_EIO], w_EIO.dtype) == "grouped_mm":
        return grouped_mm(x_NI, w_EIO, offs_E)
    return loop_mm(x_NI, w_EIO.to(compute_dtype(x_NI, w_EIO)), counts_E.tolist())


def _projection(experts, name: str, x: torch.Tensor, offs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    base = getattr(experts, "_lora_base_impl", "grouped_mm")
    use_grouped = resolve_implementation(base, x, compute_dtype(x, x)) == "grouped_mm"
    quantized = getattr(experts, "_quantized", None)
    if quantized is not None and name in quantized:  # QLoRA: the stack is stored 4/8-bit
        y = quantized[name].grouped_mm(x, offs, counts)
    else:
        y = expert_mm(x, getattr(experts, name), offs, counts, use_grouped)
    for lhs, rhs, scaling in factors(experts, name):
        low = expert_mm(expert_mm(x, lhs, offs, counts, use_grouped), rhs, offs, counts, use_grouped)
        y = y + scaling * low.to(y.dtype)
    return y


def experts_lora(experts, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    offs = group_offsets(counts_E)
    h = gated_mlp(_projection(experts, "wi_gate", x_NH, offs, counts_E),
                  _projection(experts, "wi_up", x_NH, offs, counts_E))
    return _projection(experts, "wo", h, offs, counts_E)


def _straight_to_experts(self, x, *args, **kwargs):
    """Forward of the outermost ParamWrapper around the experts: no parametrization, the
    experts' backend applies the factors."""
    return self.get_base_layer()(x, *args, **kwargs)


def use_lora_backend(experts: torch.nn.Module, wrappers: dict | None = None) -> None:
    """Route `experts` through this backend. `wrappers`: parameter name -> PEFT ParamWrapper
    (outermost first is found here and made to forward straight to the experts)."""
    register_expert_backend(BACKEND, experts_lora)  # here, where it is needed: not on import
    if experts.implementation != BACKEND:
        experts._lora_base_impl = experts.implementation
        experts.implementation = BACKEND
    if wrappers:
        experts.__dict__["_lora_wrappers"] = dict(wrappers)  # a plain dict: not submodules (no cycle)
        inner = {id(w.base_layer) for w in wrappers.values()}
        for w in wrappers.values():
            if id(w) not in inner:  # the outermost: what the MoE layer calls
                w.forward = types.MethodType(_straight_to_experts, w)


def restore_backend(experts: torch.nn.Module) -> None:
    experts.__dict__.pop("_lora_wrappers", None)
    if experts.implementation == BACKEND and getattr(experts, "_quantized", None) is None:
        experts.implementation = getattr(experts, "_lora_base_impl", "grouped_mm")
