"""What the trainer calls for `--peft lora` runs: how to load the frozen base, attaching the
adapter, and the exports (adapter, base, merged folder). The checks before loading are the
trainer's (openmoe/training/preflight.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..utils.atomic import atomic_folder
from .lora import LoraSpec, attach_lora, load_adapter, merge_lora, save_adapter
from .quant import CODECS, bnb_config, quantize_experts


def from_pretrained_kwargs(cfg, amp_dtype: torch.dtype, device: str) -> dict:
    """The frozen base is stored in the compute dtype: frozen weights need no fp32 master copy."""
    kw = {"dtype": amp_dtype}
    if cfg.quantize:
        kw["quantization_config"] = bnb_config(cfg.quantize, amp_dtype)
        kw["device_map"] = {"": device}
    return kw


def prepare_model(model, cfg, amp_dtype: torch.dtype):
    """Cast a freshly built base to the compute dtype, quantize the expert stacks for QLoRA,
    then attach the LoRA adapter (every base weight frozen). A target that fits nothing raises
    ValueError naming the flag (training/preflight.py checks the same before loading)."""
    if not cfg.quantize:
        model.to(amp_dtype)  # frozen: no fp32 master copy
    else:
        quantize_experts(model, CODECS[cfg.quantize]())
    return attach_lora(model, LoraSpec.from_train_config(cfg))


def _save_hf(model, tokenizer, out: Path) -> Path:
    """An HF folder (weights, config, tokenizer), written atomically with its manifest (checked by
    train.py --init_from and infer.py)."""
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def save_base(model, tokenizer, out: Path) -> Path:
    """The frozen base of a LoRA-wrapped model as an HF folder (no copy: a meta-built model
    takes the same tensors)."""
    from .. import OpenMoeForCausalLM

    sd = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    with torch.device("meta"):
        plain = OpenMoeForCausalLM(model.config)
    plain.load_state_dict(sd, strict=True, assign=True)
    return _save_hf(plain, tokenizer, out)


def export(model, tokenizer, out: Path, *, init_from: str | None, merge: bool, quantize: str | None,
           model_overrides: dict, ps, log=print) -> Path:
    """out/adapter (PEFT format); out/base when the run started from fresh weights (init_from
    None); with merge, out/final: the merged HF folder. Rank 0 writes, the others wait (ps: the
    run's ParallelState). Returns the folder to generate with."""
    if not ps.is_main:
        if ps.distributed:
            import torch.distributed as dist

            dist.barrier()
        return out / "adapter"
    base = init_from
    if base is None:
        base = str(save_base(model, tokenizer, out / "base"))
        log(f"exported base HF folder: {base}")
    adapter = save_adapter(model, out / "adapter", base_model=base, tokenizer=tokenizer)
    log(f"exported LoRA adapter (PEFT format): {adapter}")
    result = adapter
    if merge:
        result = export_merged(model, adapter, tokenizer, out / "final", init_from=init_from, quantize=quantize,
                               model_overrides=model_overrides)
        log(f"exported merged HF folder: {result}")
    if ps.distributed:
        import torch.distributed as dist

        dist.barrier()
    return result


def export_merged(model, adapter: Path, tokenizer, final: Path, *, init_from: str | None, quantize: str | None,
                  model_overrides: dict) -> Path:
    """Merging into 4/8-bit weights would round the update away: a QLoRA adapter is merged into
    the base reloaded (from init_from) in the compute dtype on the CPU, the usual QLoRA recipe."""
    if quantize:
        from .. import OpenMoeForCausalLM

        model = OpenMoeForCausalLM.from_pretrained(init_from, dtype=torch.bfloat16, **model_overrides)
        load_adapter(model, adapter)
    return _save_hf(merge_lora(model), tokenizer, final)
