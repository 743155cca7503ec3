"""Parameter-efficient fine-tuning: LoRA through PEFT (attention, MLPs, router, stacked experts
on the grouped-GEMM path) and QLoRA through bitsandbytes."""

from .lora import LoraSpec, attach_lora, load_adapter, merge_lora, save_adapter
from .targets import DEFAULT_TARGETS, KINDS, SINGLE

__all__ = ["LoraSpec", "attach_lora", "load_adapter", "merge_lora", "save_adapter",
           "DEFAULT_TARGETS", "KINDS", "SINGLE"]
