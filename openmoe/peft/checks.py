"""TrainConfig checks of the fine-tuning fields (peft, lora_*, merge, quantize): bad values and
bad combinations get a ValueError naming the flag; the config turns it into a ConfigError."""

from __future__ import annotations

from .targets import select

PEFT_METHODS = ("lora",)
QUANT_MODES = ("4bit", "8bit")


def check_peft_fields(cfg) -> None:
    if cfg.peft is not None and cfg.peft not in PEFT_METHODS:
        raise ValueError(f"peft={cfg.peft!r}: choose {' or '.join(PEFT_METHODS)} (or none for full fine-tuning)")
    if cfg.quantize is not None and cfg.quantize not in QUANT_MODES:
        raise ValueError(f"quantize={cfg.quantize!r}: choose 4bit or 8bit (or none)")
    if cfg.quantize and not cfg.peft:
        raise ValueError(f"quantize={cfg.quantize!r}: quantized weights are frozen; QLoRA needs --peft lora")
    if cfg.merge and not cfg.peft:
        raise ValueError("merge=True: there is no adapter to merge without --peft lora")
    if not cfg.peft:
        return
    from .lora import LoraSpec

    targets = list(LoraSpec.from_train_config(cfg).targets)
    if cfg.ep > 1 and select(targets).expert_params:
        raise ValueError(f"ep={cfg.ep}: LoRA on expert-parallel experts is not supported yet; drop 'experts' "
                         f"from --lora_targets or use --ep 1")
    if cfg.freeze:
        raise ValueError(f"freeze={cfg.freeze!r}: with --peft lora every base weight is frozen already; "
                         f"choose what to adapt with --lora_targets")
