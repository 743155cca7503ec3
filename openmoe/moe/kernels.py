"""Grouped GEMM for expert-sorted rows: y[rows of e] = x[rows of e] @ w[e], one kernel per call.

`grouped_mm(x_NI, w_EIO, offs_E)` runs torch's `F.grouped_mm` (`torch._grouped_mm` before 2.10).
Rows past `offs_E[-1]` belong to no expert: the kernel leaves those output rows (and their input
gradient) unwritten, and the dispatcher masks them (moe/dispatch.py).

Under torch.compile, inductor lowers grouped_mm for bfloat16 only (its fake-tensor check rejects
float32). Other dtypes go through `grouped_mm_op`, a custom op the compiler treats as one
opaque call with a known output shape: the same eager kernel runs inside the compiled graph, so
float32 (and fp16) models compile with fullgraph=True and keep their numerics. No host sync in
either: the group offsets stay a device tensor.
"""

from __future__ import annotations

from typing import Callable

import re

import torch
import torch.nn.functional as F

# One op namespace per module copy: a folder's bundled modeling code (trust_remote_code) imports
# its own copy of this file beside the installed package, and an op name can be defined once.
_NS = re.sub(r"\W", "_", __name__)


def grouped_mm_fn() -> Callable | None:
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _native(x_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return grouped_mm_fn()(x_NI, w_EIO, offs=offs_E)


@torch.library.custom_op(f"{_NS}::grouped_mm", mutates_args=())
def grouped_mm_op(x_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return _native(x_NI, w_EIO, offs_E)


@grouped_mm_op.register_fake
def _(x_NI, w_EIO, offs_E):
    return x_NI.new_empty(x_NI.shape[0], w_EIO.shape[-1])


@torch.library.custom_op(f"{_NS}::grouped_mm_backward", mutates_args=())
def grouped_mm_backward_op(g_NO: torch.Tensor, x_NI: torch.Tensor, w_EIO: torch.Tensor,
                           offs_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dx = g @ w[e]^T per group; dw[e] = x[rows of e]^T @ g[rows of e] (the 2D x 2D grouped form:
    experts with no rows get zeros)."""
    g_NO = g_NO.contiguous()
    gx = _native(g_NO, w_EIO.transpose(-2, -1), offs_E)
    gw = _native(x_NI.transpose(0, 1), g_NO, offs_E)
    return gx, gw


@grouped_mm_backward_op.register_fake
def _(g_NO, x_NI, w_EIO, offs_E):
    return x_NI.new_empty(x_NI.shape), w_EIO.new_empty(w_EIO.shape)


def _setup_context(ctx, inputs, output):
    x_NI, w_EIO, offs_E = inputs
    ctx.save_for_backward(x_NI, w_EIO, offs_E)


def _backward(ctx, g_NO):
    x_NI, w_EIO, offs_E = ctx.saved_tensors
    gx, gw = grouped_mm_backward_op(g_NO, x_NI, w_EIO, offs_E)
    return (gx if ctx.needs_input_grad[0] else None), (gw if ctx.needs_input_grad[1] else None), None


grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # grouped_mm's CPU backward rejects expanded (stride-0) gradients, e.g. from .sum().
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def compute_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """grouped_mm is not autocast-aware: under autocast use its dtype (as torch.matmul would),
    else the weights' dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return w.dtype


def grouped_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows of x (sorted by expert, group e ends at offs_E[e], int32) times their expert's
    matrix, in compute_dtype (both operands cast)."""
    dtype = compute_dtype(x_NI, w_EIO)
    x_NI, w_EIO = x_NI.to(dtype), w_EIO.to(dtype)
    if torch.compiler.is_compiling():
        if dtype == torch.bfloat16:
            return _native(x_NI, w_EIO, offs_E)  # inductor lowers it (and tunes it on GPUs)
        return grouped_mm_op(x_NI, w_EIO, offs_E)  # opaque to the compiler, same kernel
    return _contiguous_grad(_native(x_NI, w_EIO, offs_E))
