"""Capacity, priority and loss rules of openmoe/moe/router.py on hand-worked cases."""

import math

import pytest
import torch

from openmoe.moe.router import (CapacityPolicy, colossalai_capacity, route, t5x_capacity,
                                t5x_num_groups, t5x_padding, top_k_experts)

PREF0 = [1.0, 0.0]  # prefers expert 0, second choice 1
PREF1 = [0.0, 1.0]


def _logits(rows):
    return torch.tensor([rows], dtype=torch.float32)  # [1, S, E]


def test_t5x_num_groups_rules():
    assert t5x_num_groups(48, 4096, 4) == 4  # reference worked example: 4 groups of 12
    assert t5x_num_groups(2048, 4096, 32) == 32  # 8B scoring one sequence: 32 groups of 64
    assert t5x_num_groups(48, 4096, 16) == 16  # base, 2 x 24 tokens: 16 groups of 3
    assert t5x_num_groups(16 * 4096, 4096, 16) == 16  # groups reach max size only here
    assert t5x_num_groups(2 * 16 * 4096, 4096, 16) == 32


def test_t5x_num_groups_steps_to_multiple_of_experts():
    # 6 groups would do for the size, but 6 % 4 != 0: the count rises to 8.
    assert t5x_num_groups(24576, 4096, 4) == 8


def test_t5x_capacity_rounds_half_to_even_with_minimum():
    assert t5x_capacity(12, 4, 2.0, 4) == 6  # reference worked example
    assert t5x_capacity(5, 4, 2.0, 0) == 2  # 2.5 -> 2 (half to even), not 3
    assert t5x_capacity(7, 4, 2.0, 0) == 4  # 3.5 -> 4
    assert t5x_capacity(5, 4, 2.0, 4) == 4  # the minimum wins
    assert t5x_capacity(64, 32, 2.0, 4) == 4  # 8B, one 2048 sequence: 4 per expert per group


def test_colossalai_capacity_floor_then_even():
    # ColossalAI get_capacity: floor(k*cf*T/E), +1 if odd, then min. 4.5 -> 4 (a "ceil to even"
    # reading, as the reference words it, would give 6: the code is what ran).
    assert colossalai_capacity(9, 4, 2, 1.0, 0) == 4
    assert colossalai_capacity(7, 4, 2, 1.0, 0) == 4  # 3.5 -> 3 -> 4
    assert colossalai_capacity(10, 4, 2, 1.25, 0) == 6  # 6.25 -> 6
    assert colossalai_capacity(2, 4, 2, 1.25, 4) == 4


def test_t5x_padding_picks_fewer_zero_tokens():
    assert t5x_padding(2, 24, 4) == (0, 0)
    assert t5x_padding(3, 5, 4) == (1, 0)  # one more row: 5 tokens; columns would need 9
    assert t5x_padding(2, 3, 4) == (0, 1)  # one more position per row: 2 tokens; rows need 6
    assert t5x_padding(1, 1, 16) == (15, 0)  # decode step: padded up to E tokens


def test_top_k_ties_go_to_lower_index():
    probs = torch.full((3, 4), 0.25)
    assert top_k_experts(probs, 2).tolist() == [[0, 1]] * 3
    probs = torch.tensor([[0.1, 0.4, 0.1, 0.4]])
    assert top_k_experts(probs, 3).tolist() == [[1, 3, 0]]


def test_t5x_groups_and_priority_hand_case():
    # E=2, 8 tokens -> 2 groups of 4; cf 1.0 -> capacity round(1*4/2) = 2 (min 0).
    logits = _logits([PREF0, PREF0, PREF0, PREF1, PREF1, PREF1, PREF1, PREF1])
    pol = CapacityPolicy("t5x", capacity_factor_eval=1.0, min_capacity=0)
    r = route(logits, 2, pol, training=False)
    assert (r.num_groups, r.capacity) == (2, 2)
    # Group 0, expert 0: top-1 arrivals t0, t1 win, t2 is dropped; top-2 t3 finds it full.
    # Expert 1: t3 (top-1) then t0 (top-2) win; t1, t2 (top-2) dropped. t2 loses both.
    # Group 1, expert 1: t4, t5 (top-1) win; expert 0: t4, t5 (top-2) win; t6, t7 lose both.
    assert r.keep_TK.tolist() == [[True, True], [True, False], [False, False], [True, False],
                                  [True, True], [True, True], [False, False], [False, False]]
    assert (r.weight_TK[~r.keep_TK] == 0).all()
    p_hi = math.e / (1 + math.e)
    assert r.weight_TK[0].tolist() == pytest.approx([p_hi, 1 - p_hi])


def test_t5x_uses_training_capacity_factor():
    logits = _logits([PREF0] * 8)
    pol = CapacityPolicy("t5x", capacity_factor_train=1.0, capacity_factor_eval=2.0, min_capacity=0)
    assert route(logits, 2, pol, training=True).capacity == 2
    assert route(logits, 2, pol, training=False).capacity == 4


def test_colossalai_single_group_priority_hand_case():
    # One group of 8; capacity floor(2 * 0.5 * 8 / 2) = 4.
    logits = _logits([PREF0, PREF0, PREF0, PREF1, PREF1, PREF1, PREF1, PREF1])
    pol = CapacityPolicy("colossalai", capacity_factor_eval=0.5, min_capacity=0)
    r = route(logits, 2, pol, training=False)
    assert (r.num_groups, r.capacity) == (1, 4)
    # Expert 0: top-1 t0,t1,t2 then top-2 t3 (4 slots); t4..t7 top-2 dropped.
    # Expert 1: top-1 t3,t4,t5,t6 fill it; t7 top-1 and every top-2 dropped.
    assert r.keep_TK.tolist() == [[True, False]] * 3 + [[True, True]] + [[True, False]] * 3 + [[False, False]]


def test_t5x_zero_padding_tokens_take_slots():
    # B=1, S=5, E=2: one zero token appended at the end -> 6 tokens, 2 groups of 3;
    # cf 2/3 -> capacity round(2/3 * 3 / 2) = 1. Group 1 is t3, t4, zero-token.
    # The zero token has logits 0 -> top-1 expert 0 (tie to the lower index). Its top-1 arrival
    # precedes every top-2, so t3's second choice (expert 0) is dropped; t4 loses both.
    logits = _logits([PREF0, PREF0, PREF1, PREF1, PREF1])
    pol = CapacityPolicy("t5x", capacity_factor_eval=2 / 3, min_capacity=0)
    r = route(logits, 2, pol, training=False)
    assert (r.num_groups, r.capacity) == (2, 1)
    assert r.expert_TK.shape == (5, 2)  # the zero token is removed
    assert r.keep_TK[3].tolist() == [True, False]
    assert r.keep_TK[4].tolist() == [False, False]


def test_masked_tokens_take_no_capacity():
    logits = _logits([PREF0, PREF0, PREF0, PREF0])
    pol = CapacityPolicy("colossalai", capacity_factor_eval=0.25, min_capacity=0)  # capacity 2
    r = route(logits, 2, pol, training=False)
    assert r.capacity == 2
    assert r.keep_TK[:, 0].tolist() == [True, True, False, False]
    mask = torch.tensor([[0, 1, 1, 1]])
    r = route(logits, 2, pol, training=False, token_mask_BS=mask)
    assert r.keep_TK[:, 0].tolist() == [False, True, True, False]
    assert not r.keep_TK[0].any() and r.weight_TK[0].abs().sum() == 0


def test_dropless_keeps_everything():
    logits = torch.randn(2, 9, 4)
    r = route(logits, 2, CapacityPolicy("dropless"), training=False)
    assert r.keep_TK.all() and r.capacity is None


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="capacity policy"):
        route(torch.randn(1, 4, 2), 1, CapacityPolicy("bogus"), training=False)


def test_losses_hand_values():
    # Uniform logits: z = logsumexp(0,0,0,0)^2 = log(4)^2. Every token picks experts 0 and 1
    # (ties to the lower index): f = [1, 1, 0, 0], P = 1/4 each: E^2 * mean(f * P) = 16 * 0.125.
    logits = torch.zeros(1, 8, 4)
    r = route(logits, 2, CapacityPolicy("dropless"), training=False)
    assert r.z_loss.item() == pytest.approx(math.log(4) ** 2)
    assert r.aux_loss.item() == pytest.approx(2.0)


def test_aux_loss_matches_per_group_formula():
    torch.manual_seed(1)
    logits = torch.randn(2, 8, 4)
    r = route(logits, 2, CapacityPolicy("t5x", min_capacity=0), training=False)
    probs = torch.softmax(logits.reshape(4, 4, 4), -1)  # 4 groups of 4 tokens
    chosen = torch.zeros_like(probs).scatter_(-1, probs.topk(2, -1).indices, 1.0)
    expected = (chosen.mean(1) * probs.mean(1)).mean() * 16
    assert r.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_norm_topk_prob_renormalises():
    logits = torch.randn(1, 6, 4)
    r = route(logits, 2, CapacityPolicy("dropless"), training=False, norm_topk_prob=True)
    assert torch.allclose(r.weight_TK.sum(-1), torch.ones(6))


def test_capacity_at_least_group_size_keeps_all_without_sorting(monkeypatch):
    import openmoe.moe.router as R

    def boom(*a, **k):
        raise AssertionError("queue_positions should not run when nothing can drop")

    monkeypatch.setattr(R, "queue_positions", boom)
    logits = torch.randn(1, 16, 4)
    r = R.route(logits, 2, CapacityPolicy("t5x", capacity_factor_eval=2.0, min_capacity=4), training=False)
    assert r.capacity >= 16 // r.num_groups and r.keep_TK.all()


# second_expert="random" (Mesh TensorFlow's second_policy="random")


def _second_case():
    """3 tokens, 4 experts, logits = log p so the probabilities are exact by construction."""
    p = torch.tensor([[0.5, 0.3, 0.1, 0.1],     # top-1 e0, top-2 e1: g2 = 0.3 / 0.8 = 0.375
                      [0.1, 0.6, 0.2, 0.1],     # top-1 e1, top-2 e2: g2 = 0.2 / 0.8 = 0.25
                      [0.25, 0.25, 0.4, 0.1]])  # top-1 e2, top-2 e0 (tie, lower index): g2 = 0.25 / 0.65
    return p.log().view(1, 3, 4)


def test_random_second_expert_hand_case():
    # torch.Generator().manual_seed(0) draws u = 0.4963, 0.7682, 0.0885 (one per token).
    u = torch.rand(3, generator=torch.Generator().manual_seed(0))
    assert u.tolist() == pytest.approx([0.4963, 0.7682, 0.0885], abs=1e-4)
    # threshold 0.5 (GShard's 2 * g2): keep iff u < g2 / 0.5
    #   token 0: 0.4963 < 0.75   -> kept;  token 1: 0.7682 < 0.5 -> dropped;  token 2: 0.0885 < 0.769 -> kept
    r = route(_second_case(), 2, CapacityPolicy("dropless"), training=True, second_expert="random",
              second_threshold=0.5, generator=torch.Generator().manual_seed(0))
    assert r.expert_TK.tolist() == [[0, 1], [1, 2], [2, 0]]
    assert r.keep_TK.tolist() == [[True, True], [True, False], [True, True]]
    assert r.weight_TK[1].tolist() == pytest.approx([0.6, 0.0])  # a dropped choice combines with 0
    assert r.tokens_per_expert(4).tolist() == [2, 2, 1, 0]
    assert not r.all_kept
    # threshold 0.2 (Mesh TF's default): g2 / 0.2 = 1.875, 1.25, 1.92 -> every second choice kept
    r = route(_second_case(), 2, CapacityPolicy("dropless"), training=True, second_expert="random",
              generator=torch.Generator().manual_seed(0))
    assert r.keep_TK.all()


def test_random_second_expert_only_in_training_and_only_when_asked():
    for kw in ({"training": False, "second_expert": "random"}, {"training": True, "second_expert": "all"}):
        r = route(_second_case(), 2, CapacityPolicy("dropless"), second_threshold=0.5,
                  generator=torch.Generator().manual_seed(0), **kw)
        assert r.keep_TK.all() and r.all_kept, kw


def test_random_second_expert_keep_rate_and_capacity():
    # g2 = 0.25 for every token, threshold 0.5: the second choice survives half the time
    p = torch.tensor([0.6, 0.2, 0.1, 0.1]).log().expand(20000, 4).reshape(1, 20000, 4)
    r = route(p, 2, CapacityPolicy("dropless"), training=True, second_expert="random", second_threshold=0.5)
    assert r.keep_TK[:, 1].float().mean().item() == pytest.approx(0.5, abs=0.015)
    # a dropped second choice leaves before the queue: capacity-limited e1 takes the kept ones first
    pol = CapacityPolicy("colossalai", 1.0, 1.0, min_capacity=0)
    g = torch.Generator().manual_seed(0)
    keep2 = route(p[:, :8], 2, CapacityPolicy("dropless"), training=True, second_expert="random",
                  second_threshold=0.5, generator=g).keep_TK[:, 1]
    r = route(p[:, :8], 2, pol, training=True, second_expert="random", second_threshold=0.5,
              generator=torch.Generator().manual_seed(0))
    # capacity floor(2 * 1.0 * 8 / 4) = 4: e1 gets the first 4 kept second choices
    first4 = torch.zeros(8, dtype=torch.bool)
    first4[keep2.nonzero().flatten()[:4]] = True
    assert torch.equal(r.keep_TK[:, 1], first4)


def test_random_second_expert_bad_options():
    with pytest.raises(ValueError, match="second_expert='sample'"):
        route(_second_case(), 2, CapacityPolicy("dropless"), training=True, second_expert="sample")
    with pytest.raises(ValueError, match="top-2 rule; top_k is 1"):
        route(_second_case(), 1, CapacityPolicy("dropless"), training=True, second_expert="random")
    with pytest.raises(ValueError, match="second_threshold=0"):
        route(_second_case(), 2, CapacityPolicy("dropless"), training=True, second_expert="random",
              second_threshold=0)


def test_random_second_expert_without_host_sync():
    from test_no_sync import no_host_sync

    from openmoe.moe import MoELayer

    layer = MoELayer(16, 4, 2, intermediate_size=16, capacity=CapacityPolicy("t5x"), second_expert="random",
                     second_threshold=0.5, aux_loss=0.01, experts_implementation="grouped_mm").train()
    x = torch.randn(2, 24, 16, requires_grad=True)
    with no_host_sync():
        y, out = layer(x)
        (y.square().mean() + out.loss).backward()
    assert torch.isfinite(x.grad).all()
    assert out.tokens_per_expert.sum() < 2 * 48  # some second choices were dropped
