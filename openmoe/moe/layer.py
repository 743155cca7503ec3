"""MoELayer = route -> dispatch -> experts -> combine, with plain tensors between the steps.

Auxiliary losses and routing statistics come back as a value (MoEOutput), never kept in
module state or globals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .dispatch import LocalDispatcher
from .experts import OpenMoeExperts
from .router import CapacityPolicy, Routing, route


@dataclass
class MoEOutput:
    router_logits: torch.Tensor  # [T, E] float32
    aux_loss: torch.Tensor | None  # load-balance loss of this layer (None under no_grad in eval)
    z_loss: torch.Tensor | None  # router z-loss of this layer (same)
    tokens_per_expert: torch.Tensor  # [E] kept assignments
    dropped_fraction: torch.Tensor  # dropped / routed assignments (padding excluded)


class MoELayer(nn.Module):
    """Top-k routed mixture of OpenMoE gated-MLP experts.

    Parameter names follow the ColossalAI / published checkpoints: `gate_weight` [E, H] is the
    router, `experts.{wi_gate, wi_up, wo}` the stacked experts.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int = 2,
                 capacity: CapacityPolicy | None = None, norm_topk_prob: bool = False,
                 jitter_noise: float = 0.0, experts_implementation: str = "grouped_mm"):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity = capacity or CapacityPolicy()
        self.norm_topk_prob = norm_topk_prob
        self.jitter_noise = jitter_noise
        self.gate_weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.experts = OpenMoeExperts(num_experts, hidden_size, intermediate_size, experts_implementation)
        self.dispatcher = LocalDispatcher()

    def router_logits(self, x_BSH: torch.Tensor) -> torch.Tensor:
        x = x_BSH.float()
        if self.training and self.jitter_noise > 0:
            # Switch-style multiplicative jitter on the router input, training only.
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        with torch.autocast(x.device.type, enabled=False):  # the router stays float32 under autocast
            return x @ self.gate_weight.float().t()

    def route(self, x_BSH: torch.Tensor, token_mask_BS: torch.Tensor | None = None) -> Routing:
        # The losses only matter when something can learn from them (or in training mode).
        return route(self.router_logits(x_BSH), self.top_k, self.capacity, self.training,
                     token_mask_BS, self.norm_topk_prob,
                     compute_losses=self.training or torch.is_grad_enabled())

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, MoEOutput]:
        """x: [B, S, H] or [T, H]; token_mask (same leading shape) 0 marks padding."""
        shape = x.shape
        x_BSH = x if x.dim() == 3 else x.unsqueeze(0)
        mask = None if token_mask is None else token_mask.reshape(x_BSH.shape[:2])
        H = shape[-1]

        routing = self.route(x_BSH, mask)
        plan = self.dispatcher.plan(routing, self.num_experts)
        x_TH = x_BSH.reshape(-1, H)
        x_NH, counts = self.dispatcher.dispatch(x_TH, plan)
        y_NH = self.experts(x_NH, counts)
        y_TH = self.dispatcher.combine(y_NH, plan, x.dtype)

        active = (routing.keep_TK.numel() if mask is None
                  else int(mask.sum().item()) * self.top_k)
        counts_E = routing.tokens_per_expert(self.num_experts)  # by logical expert, whatever the placement
        dropped = 1.0 - counts_E.sum().float() / max(active, 1)
        stats = MoEOutput(routing.logits_TE, routing.aux_loss, routing.z_loss, counts_E, dropped)
        return y_TH.view(shape), stats
