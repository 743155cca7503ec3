import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import openmoe  # noqa: F401  (registers the Auto classes)
from openmoe import OpenMoeConfig

torch.set_num_threads(2)


def tiny_config(**overrides) -> OpenMoeConfig:
    """4 layers (MoE at 1 and 3), 4 experts, head_dim 16 with 4 heads (64 != hidden 32)."""
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
              num_attention_heads=4, head_dim=16, num_experts=4, num_experts_per_tok=2,
              moe_layer_interval=2, max_position_embeddings=64, router_group_size=4096)
    kw.update(overrides)
    return OpenMoeConfig(**kw)


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
