"""LoRA through PEFT on an OpenMoE model: attach, save (PEFT format), load, merge.

The model stays an OpenMoeForCausalLM (PEFT's `inject_adapter_in_model`, as transformers'
adapter integration does), so the trainer, activation checkpointing and generation use it as
they are. Linear projections get lora.Linear; the router and the stacked experts get
lora.ParamWrapper (PEFT `target_parameters`), and the experts then run on the grouped-GEMM LoRA
backend (expert_lora.py).

One PEFT limitation is worked around here: PEFT injects all `target_parameters` in one walk over
the modules, and wrapping a MoE layer for its router parameter hides the experts inside it from
that same walk. So the router is injected in a second pass. The adapter folder is PEFT's format
(adapter_config.json, adapter_model.safetensors with `base_model.model.` keys), loadable with
`peft.PeftModel.from_pretrained` unless the router is a target; `load_adapter` here loads all.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import expert_lora
from .targets import DEFAULT_TARGETS, check_target_names, select, weight_matches

ADAPTER = "default"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = field(default_factory=lambda: tuple(DEFAULT_TARGETS))

    @classmethod
    def from_train_config(cls, cfg) -> "LoraSpec":
        targets = cfg.lora_targets.split(",") if isinstance(cfg.lora_targets, str) else cfg.lora_targets or ()
        return cls(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, tuple(targets)).validate()

    def validate(self) -> "LoraSpec":
        """ValueError naming the flag for a bad value (TrainConfig turns it into a ConfigError)."""
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"lora_rank={self.rank!r}: must be a positive integer")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"lora_alpha={self.alpha!r}: must be > 0")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora_dropout={self.dropout!r}: must be in [0, 1)")
        try:
            check_target_names(list(self.targets))
        except ValueError as e:
            raise ValueError(f"lora_targets={list(self.targets)!r}: {e}") from None
        if self.dropout > 0 and select(self.targets).parameters:
            # PEFT's ParamWrapper cannot drop out the input of a weight it only parametrizes.
            raise ValueError(f"lora_dropout={self.dropout}: dropout does not work on the router and expert "
                             f"targets (PEFT target_parameters); set --lora_dropout 0 or drop 'router'/"
                             f"'experts' from --lora_targets")
        return self


def _lora_config(spec: LoraSpec, target_modules, target_parameters, **kw):
    from peft import LoraConfig

    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=target_modules if target_modules else [],
                      target_parameters=list(target_parameters) or None, **kw)


def _moe_experts(model):
    from ..moe.experts import OpenMoeExperts

    return [m for m in model.modules() if isinstance(m, OpenMoeExperts)]


def check_matches(model, targets) -> None:
    """ValueError naming a target that adapts nothing in this model (e.g. `experts` on a model
    without MoE layers) before PEFT is called."""
    names = [n.replace(".base_layer", "") for n, _ in model.named_parameters()]
    for t in check_target_names(list(targets)):
        if not any(weight_matches(n, t) for n in names):
            c = model.config
            raise ValueError(f"lora_targets: {t!r} matches nothing in this model "
                             f"({c.num_hidden_layers} layers, MoE every {c.moe_layer_interval})")


def _inject(model, spec: LoraSpec, target_modules, expert_params, router_params, inference: bool) -> None:
    from peft import inject_adapter_in_model

    if getattr(model, "peft_config", None):
        raise ValueError("this model already carries a LoRA adapter")
    if target_modules or expert_params:
        inject_adapter_in_model(_lora_config(spec, target_modules, expert_params, inference_mode=inference),
                                model, ADAPTER)
    if router_params:  # second pass: see the module docstring
        if hasattr(model, "peft_config"):
            del model.peft_config  # one adapter, injected in two passes (avoids PEFT's multi-adapter warning)
        inject_adapter_in_model(_lora_config(spec, [], router_params, inference_mode=inference), model, ADAPTER)
    full = _lora_config(spec, target_modules, tuple(expert_params) + tuple(router_params), inference_mode=inference)
    full.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    model.peft_config = {ADAPTER: full}
    for experts, wrappers in _expert_wrappers(model).items():
        expert_lora.use_lora_backend(experts, wrappers)
    for name, p in model.named_parameters():
        is_lora = ".lora_" in name
        p.requires_grad_(is_lora and not inference)
        if is_lora and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 adapter weights: the optimizer's updates are tiny


def _expert_wrappers(model) -> dict:
    """experts module -> {stacked weight name: the PEFT ParamWrapper adapting it}."""
    from peft.tuners.lora.layer import ParamWrapper

    from ..moe.experts import OpenMoeExperts

    out: dict = {}
    for m in model.modules():
        if isinstance(m, ParamWrapper) and isinstance(m.get_base_layer(), OpenMoeExperts):
            out.setdefault(m.get_base_layer(), {})[m.parameter_name] = m
    return out


def attach_lora(model, spec: LoraSpec):
    """Adds a trainable LoRA adapter in place and returns the model; every base weight frozen."""
    spec.validate()
    check_matches(model, spec.targets)
    sel = select(spec.targets)
    if any(getattr(p, "_ep_expert", False) for p in model.parameters()) and sel.expert_params:
        raise ValueError("lora_targets: LoRA on expert-parallel (ep > 1) experts is not supported yet; "
                         "drop 'experts' from --lora_targets or use ep 1")
    _inject(model, spec, sel.module_regex, sel.expert_params, sel.router_params, inference=False)
    return model


def save_adapter(model, path: str | os.PathLike, base_model: str | None = None, tokenizer=None) -> Path:
    """PEFT format, written to a temp folder and renamed when whole."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from ..utils.atomic import atomic_folder

    cfg = copy.deepcopy(model.peft_config[ADAPTER])
    cfg.base_model_name_or_path = str(base_model) if base_model else cfg.base_model_name_or_path
    cfg.inference_mode = True
    sd = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    with atomic_folder(path, manifest=False) as tmp:
        cfg.save_pretrained(tmp)
        save_file({PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in sd.items()},
                  tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


def load_adapter(model, path: str | os.PathLike, trainable: bool = False):
    """Injects the adapter saved at `path` (same passes as attach_lora) and loads its weights;
    every LoRA weight must be found in the file and every tensor in the file used."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "adapter_config.json").is_file() or not (path / "adapter_model.safetensors").is_file():
        raise ValueError(f"adapter {path}: expected adapter_config.json and adapter_model.safetensors")
    cfg = LoraConfig.from_pretrained(str(path))
    params = tuple(cfg.target_parameters or ())
    spec = LoraSpec(cfg.r, cfg.lora_alpha, cfg.lora_dropout if trainable else 0.0)
    modules = cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules or [])
    _inject(model, spec, modules, tuple(p for p in params if ".experts." in p),
            tuple(p for p in params if ".experts." not in p), inference=not trainable)
    sd = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(path / "adapter_model.safetensors").items()}
    result = set_peft_model_state_dict(model, sd, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"adapter {path} does not fit this model: missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]}")
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data = p.data.to(torch.float32)
    return model


def merge_lora(model):
    """Folds the adapter into the base weights and removes every PEFT wrapper (innermost
    first, so nested ParamWrappers of the experts inside a wrapped MoE layer are all merged;
    PEFT's merge_and_unload skips those). Returns the plain model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    while True:
        wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        if not wrappers:
            break
        name, layer = wrappers[-1]  # pre-order: the last one has no wrapper inside it
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        layer.merge(safe_merge=True)
        setattr(parent, name.rpartition(".")[2], layer.base_layer)
    for experts in _moe_experts(model):
        expert_lora.restore_backend(experts)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model
