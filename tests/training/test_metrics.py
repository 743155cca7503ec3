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


@pytest.mark.parametrize("targets", [("experts",), ("router",), ("router", "experts")])
def test_expert_params_unchanged_by_lora_wrappers(tiny, targets):
    # by hand: 2 MoE layers x top-2 x one expert's wi_gate, wi_up and wo (the experts' part of MOE)
    from openmoe.peft.lora import LoraSpec, attach_lora
    from openmoe.training.metrics import expert_params

    m = OpenMoeForCausalLM(tiny())
    assert expert_params(m) == 2 * 2 * DENSE_MLP
    attach_lora(m, LoraSpec(rank=2, targets=targets))
    lora = sum(p.numel() for n, p in m.named_parameters() if ".lora_" in n and ".experts" in n)
    # the frozen stacks are counted wherever PEFT moved them; experts' adapters are over all E
    assert expert_params(m) == 2 * 2 * DENSE_MLP + lora * 2 // 4
