"""The remote code of a sparse-upcycled folder (moe/upcycle.py): bundled beside the weights as
modeling_upcycled.py (remote_code.py), named by config.json's `auto_map`.

An upcycled model is a transformers model (LlamaForCausalLM, GPT2LMHeadModel, ...) whose MLPs were
replaced, so no class of its own exists to load it. config.json therefore gets model_type
"openmoe_upcycled" (the base type is kept in the upcycle spec): transformers knows no such type,
so AutoModelForCausalLM.from_pretrained(folder) without trust_remote_code=True asks for it
instead of building the dense model with random MLPs. With trust_remote_code=True, UpcycledConfig
holds the base config's fields and UpcycledForCausalLM.from_pretrained rebuilds the base
architecture, re-applies the spec and loads the weights (load_upcycled): what comes back is the
base class with UpcycledMoE MLPs, as upcycle() made it.
"""

from __future__ import annotations

from transformers import PreTrainedModel
from transformers.configuration_utils import PreTrainedConfig

from .moe.upcycle import UPCYCLED_MODEL_TYPE, load_upcycled, model_from_config


class UpcycledConfig(PreTrainedConfig):
    """The base model's config fields plus the upcycle spec, as config.json holds them."""

    model_type = UPCYCLED_MODEL_TYPE


class UpcycledForCausalLM(PreTrainedModel):
    """A loader, never instantiated: from_pretrained / from_config return the base class."""

    config_class = UpcycledConfig

    def __init__(self, *args, **kwargs):
        raise TypeError("UpcycledForCausalLM is a loader: use from_pretrained or from_config, which "
                        "return the upcycled base model")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        if model_args:
            raise TypeError("upcycled models take no positional model arguments")
        return load_upcycled(pretrained_model_name_or_path, config=config, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return model_from_config(config, **kwargs)
