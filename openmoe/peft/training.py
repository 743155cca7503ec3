"""What the trainer calls for `--peft lora` runs: checks before loading, how to load the frozen
base, attaching the adapter, and the exports (adapter, base, merged folder)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .lora import LoraSpec, attach_lora, load_adapter, merge_lora, save_adapter
from .quant import CODECS, bnb_config, check_quantization, quantize_experts


def base_dtype(amp_dtype: torch.dtype) -> torch.dtype:
    """Frozen weights need no fp32 master copy: they are stored in the compute dtype."""
    return amp_dtype


def check_before_loading(cfg, device: str) -> None:
    """QLoRA's requirements (bitsandbytes, CUDA) and what needs a base folder; raises
    RuntimeError/ValueError with the flag named."""
    if cfg.quantize:
        check_quantization(cfg.quantize, device)
        if not cfg.init_from:
            raise ValueError(f"--quantize {cfg.quantize}: QLoRA fine-tunes pre-trained weights; give --init_from "
                             f"an HF folder (a fresh model has nothing to quantize)")


def from_pretrained_kwargs(cfg, amp_dtype: torch.dtype, device: str) -> dict:
    kw = {"dtype": base_dtype(amp_dtype)}
    if cfg.quantize:
        kw["quantization_config"] = bnb_config(cfg.quantize, amp_dtype)
        kw["device_map"] = {"": device}
    return kw


def prepare_model(model, cfg, amp_dtype: torch.dtype):
    """Cast a freshly built base to the compute dtype, quantize the expert stacks for QLoRA,
    then attach the LoRA adapter (every base weight frozen)."""
    if not cfg.quantize:
        model.to(base_dtype(amp_dtype))
    else:
        quantize_experts(model, CODECS[cfg.quantize]())
    from ..training.config import ConfigError

    try:
        return attach_lora(model, LoraSpec.from_train_config(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _atomic_dir(final: Path, write) -> Path:
    tmp = final.parent / f".tmp_{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    from ..utils.manifest import write_manifest

    write_manifest(tmp)  # last: the sha256 of every file, checked by train.py --init_from and infer.py
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def save_base(model, tokenizer, out: Path) -> Path:
    """The frozen base of a LoRA-wrapped model as an HF folder (no copy: a meta-built model
    takes the same tensors)."""
    from .. import OpenMoeForCausalLM

    sd = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    with torch.device("meta"):
        plain = OpenMoeForCausalLM(model.config)
    plain.load_state_dict(sd, strict=True, assign=True)

    def write(tmp):
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(out, write)


def export(trainer) -> Path:
    """out_dir/adapter (PEFT format); out_dir/base when the run started from fresh weights;
    with --merge, out_dir/final: the merged HF folder. Returns the folder to generate with."""
    cfg, model, out, ps = trainer.cfg, trainer.model, trainer.out, trainer.ps
    if not ps.is_main:
        if ps.distributed:
            import torch.distributed as dist

            dist.barrier()
        return out / "adapter"
    base = cfg.init_from
    if base is None:
        base = str(save_base(model, trainer.tokenizer.hf, out / "base"))
        trainer.log(f"exported base HF folder: {base}")
    adapter = save_adapter(model, out / "adapter", base_model=base, tokenizer=trainer.tokenizer.hf)
    trainer.log(f"exported LoRA adapter (PEFT format): {adapter}")
    result = adapter
    if cfg.merge:
        result = export_merged(model, cfg, adapter, trainer.tokenizer.hf, out / "final")
        trainer.log(f"exported merged HF folder: {result}")
    if ps.distributed:
        import torch.distributed as dist

        dist.barrier()
    return result


def export_merged(model, cfg, adapter: Path, tokenizer, final: Path) -> Path:
    """Merging into 4/8-bit weights would round the update away: a QLoRA adapter is merged into
    the base reloaded in the compute dtype on the CPU, the usual QLoRA recipe."""
    if cfg.quantize:
        from .. import OpenMoeForCausalLM

        model = OpenMoeForCausalLM.from_pretrained(cfg.init_from, dtype=torch.bfloat16, **cfg.model_overrides)
        load_adapter(model, adapter)
    merged = merge_lora(model)

    def write(tmp):
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(final, write)


def _check_targets_on_meta(cfg) -> None:
    """A target that matches nothing, found on the meta-device model (nothing allocated)."""
    from ..planner.cli import model_config
    from ..planner.params import inventory, lora_targets_of

    lora_targets_of(inventory(model_config(cfg)), LoraSpec.from_train_config(cfg).targets)


def preflight(cfg, device: str, world: int) -> None:
    """Everything a run checks before it loads weights: QLoRA's requirements, combinations the
    trainer does not support, and the memory plan against --device_memory (the table comes
    with the error). Raises ConfigError."""
    from ..planner.cli import check_fits
    from ..training.config import ConfigError

    try:
        if cfg.peft:
            if cfg.fsdp > 1:
                raise ValueError(f"fsdp={cfg.fsdp}: LoRA under FSDP2 is not supported yet; use --fsdp 1")
            check_before_loading(cfg, device)
            _check_targets_on_meta(cfg)
        check_fits(cfg, world)
    except (ValueError, RuntimeError) as e:  # PlanDoesNotFit, QuantizationUnavailable, bad combinations
        err = ConfigError(str(e))
        err.full_message = getattr(e, "full_message", False)  # the plan's table comes with the error
        raise err from None
