"""OpenMoeConfig: the HF configuration of an OpenMoE decoder.

Defaults are OpenMoE-base. Sizes and rules: docs/openmoe-numerics.md, sections 1-3.
The config also reads the ColossalAI PyTorch layout (`model_type: "llama"` plus OpenMoE fields),
mapping its field names to ours (see `_COLOSSALAI_FIELDS`).
"""

from __future__ import annotations

from transformers.configuration_utils import PreTrainedConfig

from .moe.kernels import AUTO, KERNELS
from .moe.noise import NOISE_KINDS
from .moe.router import CAPACITY_POLICIES, SECOND_EXPERT_POLICIES

# ColossalAI config field -> our field. Their values win only when ours is not given too.
_COLOSSALAI_FIELDS = {
    "router_topk": "num_experts_per_tok",
    "router_capacity_factor_train": "capacity_factor_train",
    "router_capacity_factor_eval": "capacity_factor_eval",
    "router_min_capacity": "min_capacity",
    "router_aux_loss_factor": "router_aux_loss_coef",
    "router_z_loss_factor": "router_z_loss_coef",
}
# ColossalAI's router_noisy_policy -> our router_noise (moe/noise.py: their generators as they run)
_COLOSSALAI_NOISE = {None: None, "Jitter": "colossalai_uniform", "Gaussian": "colossalai_normal"}


class OpenMoeConfig(PreTrainedConfig):
    model_type = "openmoe"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 256384
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int = 64  # independent of hidden_size (8B: 24 x 128 = 3072 != 2048)
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_dropout: float = 0.0
    use_cache: bool = True
    # T5 convention: pad 0 doubles as BOS and is attended to; eos 1.
    pad_token_id: int | None = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False
    # MoE
    num_experts: int = 16
    num_experts_per_tok: int = 2
    moe_layer_interval: int = 4  # layer i is MoE when (i + 1) % interval == 0
    capacity_policy: str = "t5x"
    capacity_factor_train: float = 1.25
    capacity_factor_eval: float = 2.0
    min_capacity: int = 4
    router_group_size: int = 4096  # t5x max_group_size
    norm_topk_prob: bool = False
    router_jitter_noise: float = 0.0
    # Training-only router options; the original (t5x) uses none: no noise, every second choice.
    router_noise: str | None = None  # jitter | gaussian | colossalai_normal | colossalai_uniform (moe/noise.py)
    router_second_expert: str = "all"  # all | random: top-2 second choice kept w.p. min(1, g2 / threshold)
    router_second_threshold: float = 0.2  # the threshold of router_second_expert="random" (Mesh TF's)
    experts_implementation_name: str = "auto"  # "grouped_mm", "eager" (per-expert loop), "auto" (per device/dtype)
    # Losses
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 1e-4
    output_z_loss_coef: float = 1e-4
    output_router_logits: bool = False

    def __post_init__(self, **kwargs):
        if kwargs.get("model_type") == "llama" or "router_topk" in kwargs:
            self._from_colossalai(kwargs)
        kwargs.pop("model_type", None)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        self.validate_openmoe()

    def _from_colossalai(self, kwargs: dict) -> None:
        """Map the ColossalAI 'llama + OpenMoE fields' config onto ours (in place)."""
        for theirs, ours in _COLOSSALAI_FIELDS.items():
            if theirs in kwargs:
                setattr(self, ours, kwargs.pop(theirs))
        if self.hidden_act == "swiglu":  # their name for the three-way gate with silu
            self.hidden_act = "silu"
        # Their configs carry Llama's token ids; the umT5 tokenizer has pad/BOS 0, eos 1.
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 0, 1
        if "router_noisy_policy" in kwargs:
            noisy = kwargs.pop("router_noisy_policy")
            if noisy not in _COLOSSALAI_NOISE:
                raise ValueError(f"router_noisy_policy={noisy!r}: ColossalAI knows {list(_COLOSSALAI_NOISE)}")
            self.router_noise = _COLOSSALAI_NOISE[noisy]
        for unused in ("pretraining_tp", "router_drop_tks", "drop_tks",
                       "enable_kernel", "enable_comm_overlap", "enable_hierarchical_alltoall",
                       "expert_parallel", "label_smoothing", "dropout_rate", "rope_scaling"):
            kwargs.pop(unused, None)
        if "rope_theta" in kwargs:
            self.rope_theta = kwargs.pop("rope_theta")
        self.architectures = ["OpenMoeForCausalLM"]
        kwargs.pop("auto_map", None)

    def validate_openmoe(self) -> None:
        """Raise ValueError naming the field for values the model cannot run with."""

        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"OpenMoeConfig.{field}={getattr(self, field)!r}: {msg}")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
                  "num_experts_per_tok", "moe_layer_interval", "router_group_size",
                  "max_position_embeddings"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, "must be a positive integer")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"must divide num_attention_heads={self.num_attention_heads}")
        need(self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
             f"top-k cannot exceed num_experts={self.num_experts}")
        need(self.capacity_policy in CAPACITY_POLICIES, "capacity_policy",
             f"unknown capacity policy; choose one of {CAPACITY_POLICIES}")
        for f in ("capacity_factor_train", "capacity_factor_eval"):
            v = getattr(self, f)
            need(isinstance(v, (int, float)) and v > 0, f, "must be a positive number")
        need(isinstance(self.min_capacity, int) and self.min_capacity >= 0, "min_capacity",
             "must be a non-negative integer")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        need(self.hidden_act == "silu", "hidden_act", "OpenMoE's gated MLP uses silu")
        need(self.experts_implementation_name in (AUTO, *KERNELS), "experts_implementation_name",
             f"choose one of {(AUTO, *KERNELS)}")
        for f in ("router_aux_loss_coef", "router_z_loss_coef", "output_z_loss_coef", "router_jitter_noise"):
            v = getattr(self, f)
            need(isinstance(v, (int, float)) and v >= 0, f, "must be a non-negative number")
        need(self.router_noise is None or self.router_noise in NOISE_KINDS, "router_noise",
             f"choose null or one of {NOISE_KINDS}")
        need(self.router_noise is None or not self.router_jitter_noise, "router_noise",
             f"give router_noise or router_jitter_noise={self.router_jitter_noise}, not both")
        need(self.router_second_expert in SECOND_EXPERT_POLICIES, "router_second_expert",
             f"choose one of {SECOND_EXPERT_POLICIES}")
        need(self.router_second_expert == "all" or self.num_experts_per_tok == 2, "router_second_expert",
             f"'random' is a top-2 rule; num_experts_per_tok is {self.num_experts_per_tok}")
        v = self.router_second_threshold
        need(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "router_second_threshold",
             "must be a positive number")

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (layer_idx + 1) % self.moe_layer_interval == 0


__all__ = ["OpenMoeConfig", "CAPACITY_POLICIES"]
