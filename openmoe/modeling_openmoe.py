"""OpenMoE decoder for HF transformers: attention, decoder layer, OpenMoeModel, OpenMoeForCausalLM.

The forward pass is the Jax original's (docs/openmoe-numerics.md, section 2): RoPE over the full
head_dim, softmax scale 1.0, three-way gated MLPs, MoE every N-th layer followed by an extra
dense MLP, untied float32 logits, and id 0 as a BOS that is attended to.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_openmoe import OpenMoeConfig
from .losses import lm_and_z_loss
from .moe.expert_types import gated_mlp
from .moe.layer import MoELayer, MoEOutput
from .moe.noise import RouterNoise
from .moe.router import CapacityPolicy


class OpenMoeRMSNorm(nn.Module):
    """Scale-only RMSNorm computed in float32 and cast back (flaxformer's LayerNorm 'rms')."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class OpenMoeRotaryEmbedding(nn.Module):
    """RoPE over the full head_dim, rotate-half layout, inv_freq = theta^(-2i/d)."""

    def __init__(self, config: OpenMoeConfig):
        super().__init__()
        d = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[:, :, None].float() * self.inv_freq.float()[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, D]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    B, Hkv, S, D = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, Hkv * n_rep, S, D)


def eager_attention_forward(module, query, key, value, attention_mask, scaling: float,
                            dropout: float = 0.0, **kwargs):
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


class OpenMoeMLP(nn.Module):
    """Dense three-way gated MLP: gate_proj H -> 2I, up_proj H -> I, down_proj I -> H."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated_mlp(self.gate_proj(x), self.up_proj(x)))


class OpenMoeAttention(nn.Module):
    def __init__(self, config: OpenMoeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = 1.0  # no 1/sqrt(d): the Jax init folds it into the query weights
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        H, D = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(H, config.num_attention_heads * D, bias=False)
        self.k_proj = nn.Linear(H, config.num_key_value_heads * D, bias=False)
        self.v_proj = nn.Linear(H, config.num_key_value_heads * D, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * D, H, bias=False)
        self.q_proj.init_scale = D ** -0.5

    def forward(self, hidden_states, position_embeddings, attention_mask, cache: Cache | None = None,
                **kwargs):
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)  # paged caches read kwargs
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward)
        out, weights = attention_interface(
            self, q, k, v, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class OpenMoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: OpenMoeConfig, layer_idx: int):
        super().__init__()
        self.is_moe = config.is_moe_layer(layer_idx)
        H = config.hidden_size
        self.self_attn = OpenMoeAttention(config, layer_idx)
        self.input_layernorm = OpenMoeRMSNorm(H, config.rms_norm_eps)
        self.post_attention_layernorm = OpenMoeRMSNorm(H, config.rms_norm_eps)
        if self.is_moe:
            noise = RouterNoise("jitter", config.router_jitter_noise) if config.router_jitter_noise > 0 else None
            noise = RouterNoise(config.router_noise) if config.router_noise else noise
            self.mlp = MoELayer(
                H, config.num_experts, config.num_experts_per_tok, experts="openmoe",
                intermediate_size=config.intermediate_size, capacity=CapacityPolicy.from_config(config),
                noise=noise, norm_topk_prob=config.norm_topk_prob, second_expert=config.router_second_expert,
                second_threshold=config.router_second_threshold,
                experts_implementation=config.experts_implementation_name)
            self.pre_extra_mlp_layernorm = OpenMoeRMSNorm(H, config.rms_norm_eps)
            self.extra_mlp = OpenMoeMLP(H, config.intermediate_size)
        else:
            self.mlp = OpenMoeMLP(H, config.intermediate_size)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                token_mask=None, cache: Cache | None = None, **kwargs):
        residual = hidden_states
        attn_out, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache,
            **kwargs)
        hidden_states = residual + attn_out
        moe_out = None
        if self.is_moe:
            y, moe_out = self.mlp(self.post_attention_layernorm(hidden_states), token_mask)
            hidden_states = hidden_states + y
            # The trained weights are sequential: extra MLP after the MoE, with its own norm.
            hidden_states = hidden_states + self.extra_mlp(self.pre_extra_mlp_layernorm(hidden_states))
        else:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, attn_weights, moe_out


@dataclass
class OpenMoeModelOutputWithPast(MoeModelOutputWithPast):
    moe_outputs: tuple[MoEOutput, ...] | None = None


@dataclass
class OpenMoeCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """`loss` is the total; its parts are returned separately so training can log them.
    tokens_per_expert: [num MoE layers, E] kept assignments; dropped_fraction: [num MoE layers]."""

    lm_loss: torch.Tensor | None = None
    router_z_loss: torch.Tensor | None = None
    output_z_loss: torch.Tensor | None = None
    tokens_per_expert: torch.Tensor | None = None
    dropped_fraction: torch.Tensor | None = None


class OpenMoePreTrainedModel(PreTrainedModel):
    config_class = OpenMoeConfig
    config: OpenMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OpenMoeDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    # The forward compiles with fullgraph=True (tests/test_compile.py), and so does the decode
    # step generate compiles with a static cache (tests/test_decode.py).
    _can_compile_fullgraph = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # q_proj carries init_scale = 1/sqrt(head_dim): the Jax init folds the softmax scale
            # into the query weights, since the scores use scale 1.
            init.normal_(module.weight, mean=0.0, std=std * getattr(module, "init_scale", 1.0))
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)  # id 0 is a real BOS: no zeroed row
        elif isinstance(module, OpenMoeRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MoELayer):
            init.normal_(module.gate_weight, mean=0.0, std=std)
            for w in (module.experts.wi_gate, module.experts.wi_up, module.experts.wo):
                init.normal_(w, mean=0.0, std=std)
        elif isinstance(module, OpenMoeRotaryEmbedding):
            d = self.config.head_dim
            inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
            init.copy_(module.inv_freq, inv)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also writes the modeling code beside the weights (hub convention: `auto_map`), so the
        folder loads with trust_remote_code=True where openmoe is not installed."""
        from .remote_code import AUTO_MAP, write_remote_code

        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code(save_directory)


class OpenMoeModel(OpenMoePreTrainedModel):
    def __init__(self, config: OpenMoeConfig):
        super().__init__(config)
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(OpenMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = OpenMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = OpenMoeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, use_cache: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, **kwargs) -> OpenMoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("OpenMoeModel: give exactly one of input_ids or inputs_embeds")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None
                                    else self.config.output_hidden_states)
        output_attentions = bool(output_attentions if output_attentions is not None
                                 else self.config.output_attentions)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, S = inputs_embeds.shape[:2]
        # HF's mask builder reads given position ids for packed documents (restarts), which costs
        # a host sync outside torch.compile; positions we make ourselves are never packed.
        # Caches that place tokens themselves (paged attention) come with position ids.
        packed_positions = position_ids
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + S, device=inputs_embeds.device).unsqueeze(0).expand(B, S)
            if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] != past + S:
                raise ValueError(f"attention_mask has length {attention_mask.shape[1]}, expected "
                                 f"past ({past}) + new ({S}) tokens = {past + S}")
        causal_mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                         attention_mask=attention_mask, cache=cache,
                                         position_ids=packed_positions)
        # Tokens of the current step that are padding take no expert capacity.
        token_mask = attention_mask[:, -S:].bool() if attention_mask is not None and attention_mask.dim() == 2 else None

        hidden = inputs_embeds
        pos_emb = self.rotary_emb(hidden, position_ids)
        all_hidden = (hidden,) if output_hidden_states else None
        all_attn = () if output_attentions else None
        moe_outputs = []
        for layer in self.layers:
            hidden, attn_w, moe_out = layer(hidden, position_embeddings=pos_emb, attention_mask=causal_mask,
                                            token_mask=token_mask, cache=cache, **kwargs)
            if moe_out is not None:
                moe_outputs.append(moe_out)
            if output_hidden_states:
                all_hidden += (hidden,)
            if output_attentions:
                all_attn += (attn_w,)
        hidden = self.norm(hidden)
        return OpenMoeModelOutputWithPast(
            last_hidden_state=hidden, cache=cache, hidden_states=all_hidden, attentions=all_attn,
            router_logits=tuple(m.router_logits for m in moe_outputs), moe_outputs=tuple(moe_outputs))


# The OpenMoE chat model often spells `</s>` as text (three pieces) instead of emitting eos.
STOP_TEXT = "</s>"


class OpenMoeForCausalLM(OpenMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {}

    def __init__(self, config: OpenMoeConfig):
        super().__init__(config)
        self.model = OpenMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, labels=None, use_cache: bool | None = None,
                output_router_logits: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> OpenMoeCausalLMOutputWithPast:
        cfg = self.config
        output_router_logits = output_router_logits if output_router_logits is not None else cfg.output_router_logits
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         return_dict=True, **kwargs)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden).float()  # logits in float32, as the original

        moe = out.moe_outputs
        with_losses = [m for m in moe if m.aux_loss is not None]  # none under no_grad in eval
        aux = torch.stack([m.aux_loss for m in with_losses]).mean() if with_losses else None
        router_z = torch.stack([m.z_loss for m in with_losses]).mean() if with_losses else None
        loss = lm_loss = output_z = None
        if labels is not None:
            # one log-sum-exp for both (a 256k vocabulary makes every [tokens, V] pass count)
            lm_loss, output_z = lm_and_z_loss(logits, labels, kwargs.get("num_items_in_batch"),
                                              shift_labels=kwargs.get("shift_labels"))
            loss = lm_loss + cfg.output_z_loss_coef * output_z
            if aux is not None:
                loss = loss + cfg.router_aux_loss_coef * aux + cfg.router_z_loss_coef * router_z
        result = OpenMoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
            attentions=out.attentions, router_logits=out.router_logits if output_router_logits else None,
            lm_loss=lm_loss, router_z_loss=router_z, output_z_loss=output_z,
            tokens_per_expert=torch.stack([m.tokens_per_expert for m in moe]) if moe else None,
            dropped_fraction=torch.stack([m.dropped_fraction for m in moe]) if moe else None)
        return result

    def generate(self, *args, **kwargs):
        """GenerationMixin.generate, also stopping on `</s>` spelled as text whenever a tokenizer
        is at hand: the one passed, or the one saved in the model's folder (pipelines do not
        pass theirs). Not in generation_config.json, where generate() would demand a tokenizer."""
        given = kwargs.get("generation_config")
        if kwargs.get("stop_strings") is None and getattr(given or self.generation_config, "stop_strings", None) is None:
            tokenizer = kwargs.get("tokenizer") or self._folder_tokenizer()
            if tokenizer is not None:
                kwargs["tokenizer"] = tokenizer
                if given is not None:  # HF wants the stop strings inside a config it is given
                    kwargs["generation_config"] = given = copy.deepcopy(given)
                    given.stop_strings = [STOP_TEXT]
                else:
                    kwargs["stop_strings"] = [STOP_TEXT]
        return super().generate(*args, **kwargs)

    def _folder_tokenizer(self):
        """The tokenizer saved beside the weights, loaded once; None where there is none."""
        if "_folder_tok" not in self.__dict__:
            path, tok = str(getattr(self.config, "_name_or_path", "") or ""), None
            if os.path.isdir(path) and any(f.startswith("tokenizer") for f in os.listdir(path)):
                from transformers import AutoTokenizer

                try:
                    tok = AutoTokenizer.from_pretrained(path)
                except (OSError, ValueError):  # no usable tokenizer: generate as without one
                    tok = None
            self.__dict__["_folder_tok"] = tok
        return self.__dict__["_folder_tok"]

    def _prepare_attention_mask_for_generation(self, inputs_tensor, generation_config, model_kwargs):
        """The pad id 0 is also the BOS. A 0 followed by another 0 is padding; a 0 followed by a
        real token (or last) is the BOS and stays visible. HF's default would mask every 0."""
        if "input_ids" in model_kwargs and model_kwargs["input_ids"].shape[1] > 0:
            inputs_tensor = model_kwargs["input_ids"]
        if inputs_tensor.dim() != 2 or inputs_tensor.dtype not in (torch.int, torch.long):
            return torch.ones(inputs_tensor.shape[:2], dtype=torch.long, device=inputs_tensor.device)
        return bos_aware_attention_mask(inputs_tensor, self.config.pad_token_id)


def bos_aware_attention_mask(input_ids: torch.Tensor, pad_id: int | None = 0) -> torch.Tensor:
    """1 for real tokens, 0 for padding, where the pad id doubles as BOS
    (docs/openmoe-numerics.md, section 2)."""
    if pad_id is None:
        return torch.ones_like(input_ids)
    is_pad = input_ids == pad_id
    next_is_pad = torch.cat([is_pad[:, 1:], torch.zeros_like(is_pad[:, :1])], dim=1)
    return (~(is_pad & next_is_pad)).long()


__all__ = ["OpenMoeForCausalLM", "OpenMoeModel", "OpenMoePreTrainedModel", "OpenMoeCausalLMOutputWithPast",
           "bos_aware_attention_mask"]
