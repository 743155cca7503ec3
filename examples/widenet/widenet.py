"""WideNet: a ViT that goes wider instead of deeper (Xue et al., AAAI 2022, arXiv:2107.11817).

Every transformer block calls the SAME attention module and the SAME mixture-of-experts FFN
(openmoe.moe.MoELayer); only the two LayerNorms are per block. The MoE makes the model wide
(E experts), sharing keeps the parameter count of roughly one block, and the per-block
LayerNorms let each block feed the shared weights a differently scaled input.

    model = WideNet(image_size=8, patch_size=2, in_channels=1, num_classes=10)
    logits, aux_loss, load = model(images)      # images [B, C, H, W]
    loss = cross_entropy(logits, labels) + aux_loss   # aux_loss: summed over the block calls

`aux_loss` is the sum of the shared layer's `out.loss` over the L block calls (None when the
layer computes no loss: eval / no_grad, or zero coefficients); `load` is [L, E], the tokens each
expert took at each block call. Both come back as values: nothing is kept in module state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openmoe.moe import MoELayer


class WideNetBlock(nn.Module):
    """Pre-norm block that owns only its LayerNorms; attention and MoE are passed in (shared)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.ln_attn = nn.LayerNorm(hidden)
        self.ln_moe = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor, attn: nn.MultiheadAttention, moe: MoELayer):
        h = self.ln_attn(x)
        x = x + attn(h, h, h, need_weights=False)[0]
        y, out = moe(self.ln_moe(x))
        return x + y, out


class WideNet(nn.Module):
    def __init__(self, image_size: int = 8, patch_size: int = 2, in_channels: int = 1,
                 num_classes: int = 10, hidden: int = 64, layers: int = 4, heads: int = 4,
                 num_experts: int = 4, top_k: int = 2, intermediate_size: int | None = None,
                 capacity="dropless", aux_loss: float = 0.01, z_loss: float = 0.0,
                 noise=None, dropout: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
        if hidden % heads:
            raise ValueError(f"hidden={hidden} is not a multiple of heads={heads}")
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches + 1, hidden) * 0.02)
        self.drop = nn.Dropout(dropout)
        # The shared weights: ONE attention and ONE MoE layer for all blocks.
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.moe = MoELayer(hidden, num_experts, top_k=top_k, experts="mlp",
                            intermediate_size=intermediate_size or 4 * hidden, capacity=capacity,
                            noise=noise, aux_loss=aux_loss, z_loss=z_loss,
                            activation=F.gelu, bias=True, dropout=dropout)
        self.blocks = nn.ModuleList(WideNetBlock(hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, P, H]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.drop(torch.cat([cls, x], dim=1) + self.pos_embed)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x[:, 0]))

    def forward(self, images: torch.Tensor, moe_layers: list[MoELayer] | None = None):
        """Returns (logits [B, classes], aux_loss (scalar or None), load [L, E]).

        moe_layers: one MoE layer per block instead of the shared one (tests use it to compare
        the shared layer with unshared copies)."""
        moes = moe_layers if moe_layers is not None else [self.moe] * len(self.blocks)
        x = self.embed(images)
        aux, loads = None, []
        for block, moe in zip(self.blocks, moes, strict=True):
            x, out = block(x, self.attn, moe)
            if out.loss is not None:
                aux = out.loss if aux is None else aux + out.loss
            loads.append(out.tokens_per_expert)
        return self.classify(x), aux, torch.stack(loads)


def count_moe_layers(model: nn.Module) -> int:
    return sum(isinstance(m, MoELayer) for m in model.modules())
