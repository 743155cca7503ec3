"""Everything a run checks before it loads weights: QLoRA's requirements, combinations the
trainer does not support, LoRA targets that match nothing (on the meta-device model), and the
memory plan against --device_memory. Here, in the training layer, because it asks both
openmoe.peft and openmoe.planner (neither of which imports the other or the trainer)."""

from __future__ import annotations

from .config import ConfigError, model_config


def check_before_loading(cfg, device: str) -> None:
    """QLoRA's requirements (bitsandbytes, CUDA) and what needs a base folder; raises
    RuntimeError/ValueError with the flag named."""
    if cfg.quantize:
        from ..peft.quant import check_quantization

        check_quantization(cfg.quantize, device)
        if not cfg.init_from:
            raise ValueError(f"--quantize {cfg.quantize}: QLoRA fine-tunes pre-trained weights; give --init_from "
                             f"an HF folder (a fresh model has nothing to quantize)")


def _check_targets_on_meta(cfg, mcfg) -> None:
    """A target that matches nothing, found on the meta-device model (nothing allocated)."""
    from ..peft.lora import LoraSpec
    from ..planner.params import inventory, lora_targets_of

    lora_targets_of(inventory(mcfg), LoraSpec.from_train_config(cfg).targets)


def preflight(cfg, device: str, world: int) -> None:
    """The checks before loading (see the module docstring); the plan's table comes with its
    error. Raises ConfigError."""
    from ..planner.cli import check_fits

    try:
        # the model config (read from init_from's config.json) only when a check needs it, so
        # a run without them meets its model's errors where it builds the model
        mcfg = model_config(cfg) if cfg.peft or cfg.device_memory else None
        if cfg.peft:
            if cfg.fsdp > 1:
                raise ValueError(f"fsdp={cfg.fsdp}: LoRA under FSDP2 is not supported yet; use --fsdp 1")
            check_before_loading(cfg, device)
            _check_targets_on_meta(cfg, mcfg)
        check_fits(cfg, mcfg, world)
    except (ValueError, RuntimeError) as e:  # PlanDoesNotFit, QuantizationUnavailable, bad combinations
        err = ConfigError(str(e))
        err.full_message = getattr(e, "full_message", False)  # the plan's table comes with the error
        raise err from None
