"""openmoe: the OpenMoE family of Mixture-of-Experts language models for HF transformers.

Importing the package registers OpenMoeConfig / OpenMoeForCausalLM with the Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_openmoe import OpenMoeConfig
from .modeling_openmoe import (
    OpenMoeCausalLMOutputWithPast,
    OpenMoeForCausalLM,
    OpenMoeModel,
    OpenMoePreTrainedModel,
    bos_aware_attention_mask,
)

AutoConfig.register("openmoe", OpenMoeConfig, exist_ok=True)
AutoModel.register(OpenMoeConfig, OpenMoeModel, exist_ok=True)
AutoModelForCausalLM.register(OpenMoeConfig, OpenMoeForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["OpenMoeConfig", "OpenMoeModel", "OpenMoeForCausalLM", "OpenMoePreTrainedModel",
           "OpenMoeCausalLMOutputWithPast", "bos_aware_attention_mask"]
