"""The expert kernels, and the one place that chooses between them.

Every expert set (moe/expert_types.py) multiplies rows sorted by expert, group e ending at
offs_E[e], by its expert's matrix: y[rows of e] = x[rows of e] @ w[e]. Two kernels do it:
  grouped_mm  torch's `F.grouped_mm` (`torch._grouped_mm` before 2.10): one kernel per call, the
              group offsets stay a device tensor (no host sync).
  eager       `loop_mm`, one torch.mm per expert: the reference, for any dtype and device; it needs
              the counts on the host (one sync per layer).
`choose_kernel` picks one for an experts module's `implementation` ("auto" by device and dtype,
grouped_mm only where the kernel takes the shapes); `EXPERT_BACKENDS` maps the names an
`implementation` may take to what runs the experts, the two kernels first.

grouped_mm: rows past `offs_E[-1]` belong to no expert: the kernel leaves those output rows (and
their input gradient) unwritten, and the dispatcher masks them (moe/dispatch.py). Under
torch.compile, inductor lowers grouped_mm for bfloat16 only (its fake-tensor check rejects
float32). Other dtypes go through `grouped_mm_op`, a custom op the compiler treats as one
opaque call with a known output shape: the same eager kernel runs inside the compiled graph, so
float32 (and fp16) models compile with fullgraph=True and keep their numerics.
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


def group_offsets(counts_E: torch.Tensor) -> torch.Tensor:
    """grouped_mm's offsets: where each expert's rows end (int32, on the counts' device)."""
    return torch.cumsum(counts_E, 0, dtype=torch.int32)


def expert_of_rows(counts_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Expert id of each of num_rows expert-sorted rows, with static shapes (repeat_interleave
    would need the counts on the host). Rows past the last expert's get E: they are dropped
    assignments, which belong to no expert."""
    rows = torch.arange(num_rows, device=counts_E.device, dtype=torch.int32)
    return torch.searchsorted(group_offsets(counts_E), rows, right=True)


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


# ---------------------------------------------------------------------------------------------
# Choosing: the names an experts `implementation` takes, and which kernel runs


KERNELS = ("grouped_mm", "eager")
AUTO = "auto"  # the kernel for the device and dtype (resolve_implementation)


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


def resolve_implementation(name: str, x: torch.Tensor, compute: torch.dtype) -> str:
    """"auto" -> the faster kernel for this device and dtype, as measured on a whole OpenMoE
    training step (docs/benchmarks.md, "Expert kernels"): on CPU the per-expert loop is 12-30%
    faster in bf16 (torch's CPU grouped_mm bf16 backward is slow), within the noise in fp32; on
    CUDA grouped_mm is one kernel. Same math either way (the loop is the reference).
    Under torch.compile "auto" is always grouped_mm: the loop needs the counts on the host (a
    graph break and a sync), grouped_mm takes them as a device tensor. Other names as they are."""
    if name != AUTO:
        return name
    if torch.compiler.is_compiling():
        return "grouped_mm"
    if x.device.type == "cpu" and compute in (torch.bfloat16, torch.float16):
        return "eager"
    return "grouped_mm"


def choose_kernel(implementation: str, x_NH: torch.Tensor, matrices: list[torch.Tensor],
                  compute: torch.dtype) -> str:
    """What runs `matrices` on the rows x_NH for an experts `implementation`: "auto" resolved
    (resolve_implementation), and grouped_mm only where the kernel takes these shapes (else the
    loop: same math, the reference). A registered backend's name comes back as it is."""
    name = resolve_implementation(implementation, x_NH, compute)
    if name == "grouped_mm" and not grouped_mm_available(x_NH, *matrices, dtype=compute):
        return "eager"
    return name


def _kernel_backend(kernel: str) -> Callable:
    def backend(experts, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return experts.run_kernel(kernel, x_NH, counts_E)

    backend.__name__ = backend.__qualname__ = f"experts_{kernel}"
    return backend


# name -> fn(experts, x_NH sorted by expert, counts_E) -> y_NH. Filled here with the two kernels
# (each runs the experts' own math, `StackedExperts.run_kernel`); an extension adds its own with
# register_expert_backend before it sets an experts `implementation` to that name.
EXPERT_BACKENDS: dict[str, Callable] = {kernel: _kernel_backend(kernel) for kernel in KERNELS}


def register_expert_backend(name: str, fn: Callable) -> None:
    """Add a backend: fn(experts_module, x_NH sorted by expert, counts_E) -> y_NH."""
    if name == AUTO:
        raise ValueError(f"{AUTO!r} names the kernel choice and cannot be a backend")
    EXPERT_BACKENDS[name] = fn


def implementations() -> tuple[str, ...]:
    """The names an experts `implementation` takes now: "auto", the kernels, registered backends."""
    return (AUTO, *EXPERT_BACKENDS)


def check_implementation(name: str) -> None:
    if name not in implementations():
        raise ValueError(f"experts implementation {name!r}: choose one of {implementations()}")
