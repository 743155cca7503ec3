"""QLoRA: frozen base weights stored 4- or 8-bit through bitsandbytes, LoRA on top.

Two kinds of weights are quantized:
  - Linear projections (attention, dense and extra MLPs): by transformers' bitsandbytes
    integration at load time (BitsAndBytesConfig; lm_head, embeddings, norms and the router
    stay in the compute dtype, as usual for QLoRA).
  - The stacked experts [E, in, out] (72% of OpenMoE-8B's weights), which are nn.Parameters
    that no Linear-replacing integration sees: each stack is quantized here as one flat tensor
    and dequantized per projection inside an autograd function that keeps only the quantized
    bytes for the backward (it dequantizes again there), so a step never holds more than one
    dequantized stack per projection. The grouped GEMM runs on the dequantized stack.

bitsandbytes is optional: `check_quantization` names what is missing (the package, a CUDA
device) before any weight is loaded. Codecs are objects with quantize/dequantize so the plumbing
is tested on CPU with a plain-torch int8 codec (`ReferenceInt8`).
"""

from __future__ import annotations

import torch

from .expert_lora import PROJECTIONS, expert_mm, use_lora_backend

MODES = ("4bit", "8bit")


class QuantizationUnavailable(RuntimeError):
    """QLoRA asked for on a machine without what it needs (the message names it)."""


def check_quantization(mode: str | None, device: str) -> None:
    if mode is None:
        return
    if mode not in MODES:
        raise QuantizationUnavailable(f"--quantize {mode!r}: choose 4bit or 8bit")
    missing = []
    if not (str(device).startswith("cuda") or device == "auto") or not torch.cuda.is_available():
        missing.append("a CUDA GPU (bitsandbytes' 4/8-bit kernels; this machine has "
                       f"{'none' if not torch.cuda.is_available() else 'device=' + str(device)})")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        missing.append("the bitsandbytes package (pip install bitsandbytes; it is not a dependency of openmoe)")
    if missing:
        raise QuantizationUnavailable(f"--quantize {mode}: QLoRA needs {' and '.join(missing)}; "
                                      f"use --quantize none for bf16 LoRA")


def bnb_config(mode: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for the Linear layers (QLoRA's NF4 + double quant)."""
    from transformers import BitsAndBytesConfig

    skip = ["lm_head"]  # logits stay in the compute dtype, as the original computes them in fp32
    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


# ---------------------------------------------------------------- codecs
class Bnb4bit:
    """NF4, blocks of 64, double-quantized absmax (QLoRA's format): ~4.13 bits per weight."""

    bits_per_weight = 4 + 8 / 64 + 32 / (64 * 256)

    def quantize(self, w: torch.Tensor):
        import bitsandbytes.functional as bf

        return bf.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")

    def dequantize(self, packed):
        import bitsandbytes.functional as bf

        return bf.dequantize_4bit(*packed)


class Bnb8bit:
    """Blockwise dynamic 8-bit (bitsandbytes' quantize_blockwise), blocks of 4096."""

    bits_per_weight = 8 + 32 / 4096

    def quantize(self, w: torch.Tensor):
        import bitsandbytes.functional as bf

        return bf.quantize_blockwise(w.contiguous(), blocksize=4096)

    def dequantize(self, packed):
        import bitsandbytes.functional as bf

        return bf.dequantize_blockwise(*packed)


class ReferenceInt8:
    """Absmax int8 per block of `block` weights, plain torch (any device): the test codec."""

    def __init__(self, block: int = 64):
        self.block = block
        self.bits_per_weight = 8 + 32 / block

    def quantize(self, w: torch.Tensor):
        flat = w.detach().float().reshape(-1, self.block)
        scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        return (torch.round(flat / scale).to(torch.int8), scale, w.shape, w.dtype)

    def dequantize(self, packed):
        q, scale, shape, dtype = packed
        return (q.float() * scale).reshape(shape).to(dtype)


CODECS = {"4bit": Bnb4bit, "8bit": Bnb8bit}


# ---------------------------------------------------------------- quantized expert stacks
class QuantizedStack:
    """One expert projection [E, in, out] held quantized. Not a Parameter: frozen, and its bytes
    are the codec's."""

    def __init__(self, w: torch.Tensor, codec):
        self.shape, self.dtype, self.codec = tuple(w.shape), w.dtype, codec
        self.packed = codec.quantize(w)

    def dequantize(self) -> torch.Tensor:
        return self.codec.dequantize(self.packed).reshape(self.shape).to(self.dtype)

    def grouped_mm(self, x: torch.Tensor, offs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return _DequantGroupedMM.apply(x, self, offs, counts)


class _DequantGroupedMM(torch.autograd.Function):
    """y = x @ dequant(W)[e] per expert group; the backward dequantizes again instead of keeping
    the full-precision stack alive between forward and backward (what bitsandbytes' Linear4bit
    does for a single matrix)."""

    @staticmethod
    def forward(ctx, x, stack, offs, counts):
        ctx.stack = stack
        ctx.save_for_backward(offs, counts)
        with torch.no_grad():
            return expert_mm(x, stack.dequantize(), offs, counts)

    @staticmethod
    def backward(ctx, gy):
        offs, counts = ctx.saved_tensors
        w_t = ctx.stack.dequantize().transpose(1, 2)  # [E, out, in]
        return expert_mm(gy.contiguous(), w_t, offs, counts), None, None, None


def quantize_experts(model: torch.nn.Module, codec) -> int:
    """Replaces every expert stack by its quantized form; the Parameter left in its place is a
    zero-stride view of the right shape and dtype (PEFT's ParamWrapper reads shapes from it),
    holding one element. Returns the number of stacks quantized."""
    from ..moe.experts import OpenMoeExperts

    n = 0
    for ex in model.modules():
        if not isinstance(ex, OpenMoeExperts) or getattr(ex, "_quantized", None):
            continue
        ex._quantized = {}
        for name in PROJECTIONS:
            w = getattr(ex, name)
            ex._quantized[name] = QuantizedStack(w.detach(), codec)
            stub = torch.zeros((), dtype=w.dtype, device=w.device).expand(w.shape)
            setattr(ex, name, torch.nn.Parameter(stub, requires_grad=False))
            del w
            n += 1
        use_lora_backend(ex)  # the backend that knows `_quantized`
    return n
