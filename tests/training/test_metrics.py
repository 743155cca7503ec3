"""openmoe/training/metrics.py: FLOPs per token (by hand, and unchanged by expert sharding) and MFU."""

import pytest

from openmoe import OpenMoeForCausalLM
from openmoe.moe.experts import shard_stacked_
from openmoe.training.metrics import active_params, flops_per_token, mfu

# tiny_config: H 32, I 48, 4 heads x 16, E 4, top-2, V 97, 4 layers with MoE at layers 1 and 3.
ATTN = 4 * 32 * 64 + 2 * 32  # q, k, v, o + two norms, every layer
DENSE_MLP = 32 * 96 + 32 * 48 + 48 * 32  # OpenMoE's gate is 2I wide
MOE = 4 * 32 + 2 * DENSE_MLP + DENSE_MLP + 32  # router, 2 of 4 experts, extra MLP + its norm
ACTIVE = 4 * ATTN + 2 * DENSE_MLP + 2 * MOE + 32 + 97 * 32  # + final norm, lm_head; no embedding


def test_active_params_and_flops_by_hand(tiny):
    m = OpenMoeForCausalLM(tiny())
    assert active_params(m) == ACTIVE == 85632
    assert flops_per_token(m, 64) == 6 * ACTIVE + 12 * 4 * 64 * 64


def test_expert_parallel_shards_count_the_same(tiny):
    # under EP a rank holds E/ep experts; a token's FLOPs do not change with where experts live
    m = OpenMoeForCausalLM(tiny())
    full = flops_per_token(m, 64)
    for layer in (1, 3):
        shard_stacked_(m.model.layers[layer].mlp.experts, 2, 4)
    assert m.model.layers[1].mlp.experts.wo.shape[0] == 2
    assert flops_per_token(m, 64) == full


def test_mfu_is_per_device():
    # 2 ranks together at 1000 tokens/s x 1 GFLOP/token = 1 TFLOP/s over 2 x 1 TFLOP/s of peak
    assert mfu(1000, 1e9, 1e12, world=2) == pytest.approx(0.5)
    assert mfu(1000, 1e9, 1e12) == pytest.approx(1.0)
