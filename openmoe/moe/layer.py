"""MoELayer = route -> dispatch -> experts -> combine, with plain tensors between the steps.

The one MoE layer of the repository: OpenMoE's decoder uses it with experts="openmoe", and it
is the public layer for any PyTorch model (a ViT, a BERT, a GPT trained with DDP):

    moe = MoELayer(hidden_size=256, num_experts=8, top_k=2, experts="swiglu",
                   intermediate_size=512, capacity="dropless", noise="jitter",
                   aux_loss=0.01, z_loss=0.001)
    y, out = moe(x)                       # x: [B, S, H] or [T, H]
    loss = task_loss + out.loss           # coefficient-weighted aux + z losses of this call

Auxiliary losses and routing statistics come back as a value (MoEOutput), never kept in
module state or globals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .dispatch import LocalDispatcher
from .expert_types import build_experts
from .noise import RouterNoise
from .router import CapacityPolicy, Routing, check_second_expert, route


@dataclass
class MoEOutput:
    router_logits: torch.Tensor  # [T, E] float32
    aux_loss: torch.Tensor | None  # load-balance loss of this layer (None under no_grad in eval)
    z_loss: torch.Tensor | None  # router z-loss of this layer (same)
    tokens_per_expert: torch.Tensor  # [E] kept assignments
    dropped_fraction: torch.Tensor  # dropped / routed assignments (padding excluded)
    loss: torch.Tensor | None = None  # aux_loss_coef * aux_loss + z_loss_coef * z_loss (None if both are)


def capacity_policy(capacity) -> CapacityPolicy:
    """None or "dropless" | "t5x" | "colossalai" | a float capacity factor (ColossalAI rule) |
    a CapacityPolicy."""
    if capacity is None:
        return CapacityPolicy("dropless")
    if isinstance(capacity, CapacityPolicy):
        return capacity
    if isinstance(capacity, str):
        return CapacityPolicy(capacity)
    if isinstance(capacity, (int, float)) and not isinstance(capacity, bool):
        return CapacityPolicy("colossalai", float(capacity), float(capacity))
    raise ValueError(f"capacity={capacity!r}: choose 'dropless', 't5x', 'colossalai', a capacity "
                     "factor or a CapacityPolicy")


class MoELayer(nn.Module):
    """Top-k routed mixture of experts.

    experts: "openmoe" (OpenMoE's three-way gated MLP), "swiglu", "gated" (SwiGLU's form with
    `activation`), "mlp" (two-layer FFN with `activation`, `bias`, `dropout`), or a factory
    returning one expert nn.Module (run per expert); see expert_types.EXPERT_TYPES.
    experts_implementation: "auto" (per device and dtype), "grouped_mm", "eager" (per-expert loop)
    or a registered backend (moe/kernels.py).
    capacity: see capacity_policy. noise: None, "jitter", "gaussian" or a RouterNoise (training only).
    aux_loss / z_loss: coefficients of the load-balance and router z losses in MoEOutput.loss.
    second_expert: "all" (every top-2 second choice) or "random" (training only: kept with
    probability min(1, g2 / second_threshold), Mesh TensorFlow's rule; router.keep_second_at_random).

    Parameter names follow the ColossalAI / published OpenMoE checkpoints: `gate_weight` [E, H] is
    the router, `experts.*` the experts.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2,
                 experts: str | Callable[[], nn.Module] = "swiglu", intermediate_size: int | None = None,
                 capacity: CapacityPolicy | str | float | None = "dropless", noise=None,
                 aux_loss: float = 0.0, z_loss: float = 0.0, norm_topk_prob: bool = False,
                 activation: str | Callable = "gelu", bias: bool = True, dropout: float = 0.0,
                 experts_implementation: str = "auto", second_expert: str = "all",
                 second_threshold: float = 0.2):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("num_experts", num_experts)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k!r} must be in [1, num_experts={num_experts}]")
        for name, v in (("aux_loss", aux_loss), ("z_loss", z_loss)):
            if not v >= 0:
                raise ValueError(f"{name}={v!r}: a loss coefficient must be >= 0")
        check_second_expert(second_expert, second_threshold, top_k)
        self.second_expert, self.second_threshold = second_expert, second_threshold
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity = capacity_policy(capacity)
        self.noise = RouterNoise.make(noise)
        self.aux_loss_coef, self.z_loss_coef = aux_loss, z_loss
        self.norm_topk_prob = norm_topk_prob
        self.gate_weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.gate_weight, std=0.02)
        self.experts = build_experts(experts, num_experts, hidden_size, intermediate_size, activation,
                                     bias, dropout, experts_implementation)
        self.dispatcher = LocalDispatcher()

    def router_logits(self, x_BSH: torch.Tensor) -> torch.Tensor:
        x = x_BSH.float()
        noisy = self.training and self.noise is not None
        if noisy:
            x = self.noise.on_input(x)
        with torch.autocast(x.device.type, enabled=False):  # the router stays float32 under autocast
            logits = x @ self.gate_weight.float().t()
        return self.noise.on_logits(logits, self.num_experts) if noisy else logits

    def route(self, x_BSH: torch.Tensor, token_mask_BS: torch.Tensor | None = None) -> Routing:
        # The losses only matter when something can learn from them (or in training mode).
        return route(self.router_logits(x_BSH), self.top_k, self.capacity, self.training,
                     token_mask_BS, self.norm_topk_prob,
                     compute_losses=self.training or torch.is_grad_enabled(),
                     second_expert=self.second_expert, second_threshold=self.second_threshold)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, MoEOutput]:
        """x: [B, S, H] or [T, H]; token_mask (same leading shape) 0 marks padding."""
        shape = x.shape
        if x.dim() not in (2, 3) or shape[-1] != self.hidden_size:
            raise ValueError(f"MoELayer input of shape {list(shape)}: expected [batch, seq, "
                             f"{self.hidden_size}] or [tokens, {self.hidden_size}]")
        x_BSH = x if x.dim() == 3 else x.unsqueeze(0)
        mask = None if token_mask is None else token_mask.reshape(x_BSH.shape[:2])

        routing = self.route(x_BSH, mask)
        plan = self.dispatcher.plan(routing, self.num_experts)
        y_TH = self.dispatcher.apply(self.experts, x_BSH.reshape(-1, shape[-1]), plan, x.dtype)

        # routed assignments of real tokens; a tensor when masked (no .item(): no host sync)
        active = (max(routing.keep_TK.numel(), 1) if mask is None
                  else (mask.sum() * self.top_k).clamp_min(1).float())
        counts_E = routing.tokens_per_expert(self.num_experts)  # by logical expert, whatever the placement
        dropped = 1.0 - counts_E.sum().float() / active
        stats = MoEOutput(routing.logits_TE, routing.aux_loss, routing.z_loss, counts_E, dropped,
                          self._weighted_loss(routing))
        return y_TH.view(shape), stats

    def _weighted_loss(self, routing: Routing) -> torch.Tensor | None:
        parts = [c * v for c, v in ((self.aux_loss_coef, routing.aux_loss), (self.z_loss_coef, routing.z_loss))
                 if c > 0 and v is not None]
        return sum(parts) if parts else None
