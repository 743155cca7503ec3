"""Routing: router logits -> top-k choices -> capacity policy -> which assignments survive.

Everything here is float32 and works on plain tensors; no expert weights are touched.
Shapes: T tokens (flattened in (batch, position) order), E experts, K = top-k, G groups.

Capacity policies, each named after where its numerics come from:
  t5x        the Jax original (flaxformer moe_layers.py / routing.py) that trained the weights:
             at least E groups of consecutive tokens, capacity max(round(cf * T_g / E), min).
  colossalai ColossalAI's PyTorch port: one group, capacity max(even(floor(k * cf * T / E)), min).
  dropless   every assignment is kept.
Priority inside a group is the same for all: every top-1 assignment in token order, then every
top-2, ...; the first C arrivals at an expert win (a dropped assignment still took its turn).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """The router's decision for T tokens. All tensors are on the logits' device."""

    expert_TK: torch.Tensor  # long, chosen expert per token and choice (choice 0 = top-1)
    weight_TK: torch.Tensor  # float32 combine weight (the router probability, 0 if dropped)
    keep_TK: torch.Tensor  # bool, the assignment survived capacity (and the token is real)
    logits_TE: torch.Tensor  # float32 router logits
    probs_TE: torch.Tensor  # float32 softmax over all experts
    group_T: torch.Tensor  # long, routing group of each token
    num_groups: int
    capacity: int | None  # per expert per group; None for dropless
    aux_loss: torch.Tensor | None  # load-balance loss (Switch form, per group, averaged)
    z_loss: torch.Tensor | None  # router z-loss: mean(logsumexp(logits)^2); None when not computed
    all_kept: bool = False  # known from shapes alone: no capacity drop possible and no padding mask

    def tokens_per_expert(self, num_experts: int) -> torch.Tensor:
        """Kept assignments per expert, shape [E] (long). A scatter-add, not bincount or a boolean
        index: both size their output from the data, a host sync on GPUs."""
        return count_per_expert(self.expert_TK, self.keep_TK, num_experts)


def count_per_expert(expert_TK: torch.Tensor, keep_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many kept assignments each expert has, [E] long, with static shapes (no host sync)."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=expert_TK.device)
    return counts.scatter_add_(0, expert_TK.reshape(-1), keep_TK.reshape(-1).long())


CAPACITY_POLICIES = ("t5x", "colossalai", "dropless")


@dataclass(frozen=True)
class CapacityPolicy:
    """How many assignments each expert takes. `name` is one of t5x, colossalai, dropless."""

    name: str = "t5x"
    capacity_factor_train: float = 1.25
    capacity_factor_eval: float = 2.0
    min_capacity: int = 4
    max_group_size: int = 4096  # t5x only

    def __post_init__(self):
        if self.name not in CAPACITY_POLICIES:
            raise ValueError(f"capacity policy {self.name!r}: choose one of {CAPACITY_POLICIES}")
        for f in ("capacity_factor_train", "capacity_factor_eval"):
            if not getattr(self, f) > 0:
                raise ValueError(f"capacity policy: {f}={getattr(self, f)!r} must be > 0")
        if self.min_capacity < 0 or self.max_group_size < 1:
            raise ValueError("capacity policy: min_capacity must be >= 0 and max_group_size >= 1")

    @classmethod
    def from_config(cls, config) -> "CapacityPolicy":
        return cls(
            name=config.capacity_policy,
            capacity_factor_train=config.capacity_factor_train,
            capacity_factor_eval=config.capacity_factor_eval,
            min_capacity=config.min_capacity,
            max_group_size=config.router_group_size,
        )

    def factor(self, training: bool) -> float:
        return self.capacity_factor_train if training else self.capacity_factor_eval


# ---------------------------------------------------------------------------------------------
# Rules of the individual policies (pure integer arithmetic, each with hand-worked tests)


def t5x_num_groups(num_tokens: int, max_group_size: int, num_experts: int, replicas: int = 1) -> int:
    """flaxformer `_num_groups`: the smallest n >= max(T // max_group_size, E * replicas) such that
    n divides T and E * replicas divides n."""
    step = num_experts * replicas
    n = max(num_tokens // max_group_size, step)
    while n < num_tokens and not (num_tokens % n == 0 and n % step == 0):
        n += 1
    if num_tokens % n:
        raise ValueError(f"t5x routing: cannot split {num_tokens} tokens into groups for {num_experts} experts")
    return n


def t5x_capacity(tokens_per_group: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    # Python's round(): half to even, exactly as the Jax code (int(round(...))).
    return max(int(round(capacity_factor * tokens_per_group / num_experts)), min_capacity)


def colossalai_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                        min_capacity: int) -> int:
    # ColossalAI MoeRouter.get_capacity: floor, then up to an even number, then the minimum.
    capacity = math.floor(top_k * capacity_factor * num_tokens / num_experts)
    capacity += capacity % 2
    return max(capacity, min_capacity)


def t5x_padding(batch: int, seq: int, num_experts: int) -> tuple[int, int]:
    """Zero tokens the Jax code appends when B*S is not a multiple of E: (extra rows, extra
    positions); only one of the two is non-zero, whichever adds fewer tokens (rows on a tie)."""
    if (batch * seq) % num_experts == 0:
        return 0, 0
    rows = next(r for r in range(1, num_experts + 1) if ((batch + r) * seq) % num_experts == 0)
    cols = next(c for c in range(1, num_experts + 1) if (batch * (seq + c)) % num_experts == 0)
    return (rows, 0) if rows * seq <= batch * cols else (0, cols)


# ---------------------------------------------------------------------------------------------


def top_k_experts(probs_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k by repeated argmax: ties go to the lower expert index (torch.topk does not promise
    that), and top-2 is 'argmax over the rest', as in the Jax code."""
    masked = probs_TE.clone()
    picks = []
    for _ in range(k):
        idx = masked.argmax(dim=-1)
        picks.append(idx)
        masked.scatter_(-1, idx.unsqueeze(-1), float("-inf"))
    return torch.stack(picks, dim=-1)


def queue_positions(expert_TK: torch.Tensor, group_T: torch.Tensor, active_TK: torch.Tensor,
                    num_experts: int, num_groups: int) -> torch.Tensor:
    """Place of each assignment in its (group, expert) queue, with priority (choice, token).

    One sort of unique int64 keys; no [T, E, C] tensor. Inactive assignments get -1.
    """
    T, K = expert_TK.shape
    device = expert_TK.device
    token_T = torch.arange(T, device=device)
    choice_K = torch.arange(K, device=device)
    segment_TK = group_T[:, None] * num_experts + expert_TK  # which queue
    segment_TK = torch.where(active_TK, segment_TK, num_groups * num_experts)  # inactive: own queue
    key_TK = (segment_TK * K + choice_K[None, :]) * T + token_T[:, None]
    order = torch.argsort(key_TK.reshape(-1))
    seg_sorted = segment_TK.reshape(-1)[order]
    counts = torch.zeros(num_groups * num_experts + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, seg_sorted, torch.ones_like(seg_sorted))  # bincount would size from data
    starts = torch.cumsum(counts, 0) - counts
    pos_sorted = torch.arange(order.numel(), device=device) - starts[seg_sorted]
    pos = torch.empty_like(pos_sorted)
    pos[order] = pos_sorted
    return torch.where(active_TK, pos.view(T, K), -1)


def load_balance_loss(probs_TE: torch.Tensor, expert_TK: torch.Tensor, weight_T: torch.Tensor,
                      num_groups: int) -> torch.Tensor:
    """Switch/flaxformer form: E^2 * mean over (group, expert) of f * P, where f is the fraction of
    the group's tokens that chose e among their top-k (before capacity) and P the mean router
    probability of e. Groups are num_groups consecutive blocks of equal size (t5x's groups, or one
    group), so per-group sums are a reshape and a sum (no scatter). weight_T (0/1) drops padded
    tokens from both means."""
    T, E = probs_TE.shape
    G = num_groups
    chose_TE = torch.zeros_like(probs_TE).scatter_(1, expert_TK, 1.0) * weight_T[:, None]
    count_G = weight_T.view(G, T // G).sum(1)
    f_GE = chose_TE.view(G, T // G, E).sum(1)
    p_GE = (probs_TE * weight_T[:, None]).view(G, T // G, E).sum(1)
    denom_G = count_G.clamp_min(1.0)[:, None]
    valid_G = (count_G > 0).float()
    per_group = (f_GE / denom_G * p_GE / denom_G).mean(dim=1)
    return (per_group * valid_G).sum() / valid_G.sum().clamp_min(1.0) * E * E


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """Stable softmax written out. torch.softmax on CPU takes ~5-8 ms on an all-zero [16, 16]
    block (measured, torch 2.13 / AVX-512; 5 us for random values), which is exactly what the
    t5x zero tokens of every decode step produce; this form takes ~12 us and agrees to 1 ulp."""
    e = torch.exp(x - x.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


SECOND_EXPERT_POLICIES = ("all", "random")


def route(
    logits_BSE: torch.Tensor,
    top_k: int,
    policy: CapacityPolicy,
    training: bool,
    token_mask_BS: torch.Tensor | None = None,
    norm_topk_prob: bool = False,
    compute_losses: bool = True,
    second_expert: str = "all",
    second_threshold: float = 0.2,
    generator: torch.Generator | None = None,
) -> Routing:
    """Route a [B, S, E] block of router logits (float32). token_mask 0 marks padding: such tokens
    take no expert slot and no part in the losses; their weights are 0.

    second_expert="random" (top-2, training only; Mesh TensorFlow / GShard): the second choice
    takes part only with probability min(1, g2 / second_threshold), g2 = p2 / (p1 + p2), drawn
    from `generator` (torch's global RNG when None); see keep_second_at_random."""
    logits_BSE = logits_BSE.float()
    B, S, E = logits_BSE.shape
    check_second_expert(second_expert, second_threshold, top_k)
    logits_BSE, mask_BS = _t5x_pad(logits_BSE, _token_mask(token_mask_BS, B, S, logits_BSE.device), policy)
    Bp, Sp = mask_BS.shape
    T = Bp * Sp
    logits_TE = logits_BSE.reshape(T, E)
    mask_T = mask_BS.reshape(T)

    probs_TE = _softmax(logits_TE)
    expert_TK, weight_TK = _choose_experts(probs_TE, top_k, norm_topk_prob)
    num_groups, capacity, group_T = _groups(policy, T, E, top_k, training, logits_TE.device)
    active_TK = mask_T[:, None].expand(T, top_k)
    if second_expert == "random" and training:
        active_TK = active_TK & keep_second_at_random(probs_TE, expert_TK, second_threshold, generator)
    keep_TK, can_drop = _apply_capacity(expert_TK, group_T, active_TK, capacity, E, num_groups)

    aux = z = None
    if compute_losses:  # skipped at inference: a dozen small ops per layer and decode step
        aux, z = _router_losses(logits_TE, probs_TE, expert_TK, mask_T, num_groups)

    def real(t):  # drop the t5x zero tokens by slicing (no boolean-mask host sync)
        return t.reshape(Bp, Sp, *t.shape[1:])[:B, :S].reshape(B * S, *t.shape[1:])

    keep_TK = real(keep_TK)
    return Routing(
        expert_TK=real(expert_TK),
        weight_TK=real(weight_TK) * keep_TK,
        keep_TK=keep_TK,
        logits_TE=real(logits_TE),
        probs_TE=real(probs_TE),
        group_T=real(group_T),
        num_groups=num_groups,
        capacity=capacity,
        aux_loss=aux,
        z_loss=z,
        # a randomly dropped second choice is a drop the shapes do not show
        all_kept=not can_drop and token_mask_BS is None and not (second_expert == "random" and training),
    )


def check_second_expert(second_expert: str, threshold: float, top_k: int) -> None:
    if second_expert not in SECOND_EXPERT_POLICIES:
        raise ValueError(f"second_expert={second_expert!r}: choose one of {SECOND_EXPERT_POLICIES}")
    if second_expert == "random" and top_k != 2:
        raise ValueError(f"second_expert='random' is a top-2 rule; top_k is {top_k}")
    if not threshold > 0:
        raise ValueError(f"second_threshold={threshold!r}: must be > 0")


def _token_mask(token_mask_BS: torch.Tensor | None, B: int, S: int, device) -> torch.Tensor:
    if token_mask_BS is None:
        return torch.ones(B, S, dtype=torch.bool, device=device)
    return token_mask_BS.bool()


def _t5x_pad(logits_BSE: torch.Tensor, mask_BS: torch.Tensor, policy: CapacityPolicy):
    """The Jax code appends zero vectors (router logits exactly 0) so E divides the token count;
    they route to experts 0 and 1 and can take the last slots. route() removes them at the end."""
    if policy.name != "t5x":
        return logits_BSE, mask_BS
    B, S, E = logits_BSE.shape
    rows, cols = t5x_padding(B, S, E)
    if rows or cols:
        logits_BSE = torch.nn.functional.pad(logits_BSE, (0, 0, 0, cols, 0, rows))
        mask_BS = torch.nn.functional.pad(mask_BS, (0, cols, 0, rows), value=True)
    return logits_BSE, mask_BS


def _choose_experts(probs_TE: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """(expert_TK, weight_TK): the top-k experts and their combine weights (router probabilities,
    renormalised over the k choices with norm_topk_prob)."""
    expert_TK = top_k_experts(probs_TE, top_k)
    weight_TK = probs_TE.gather(1, expert_TK)
    if norm_topk_prob:
        weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
    return expert_TK, weight_TK


def _groups(policy: CapacityPolicy, T: int, E: int, top_k: int, training: bool, device):
    """(num_groups, capacity per expert and group or None, group_T) of the policy; Python ints
    from shapes only."""
    if policy.name == "t5x":
        num_groups = t5x_num_groups(T, policy.max_group_size, E)
        capacity = t5x_capacity(T // num_groups, E, policy.factor(training), policy.min_capacity)
        return num_groups, capacity, torch.arange(T, device=device) // (T // num_groups)
    if policy.name == "colossalai":
        capacity = colossalai_capacity(T, E, top_k, policy.factor(training), policy.min_capacity)
        return 1, capacity, torch.zeros(T, dtype=torch.long, device=device)
    if policy.name == "dropless":
        return 1, None, torch.zeros(T, dtype=torch.long, device=device)
    raise ValueError(f"capacity policy {policy.name!r}: choose t5x, colossalai or dropless")


def _apply_capacity(expert_TK, group_T, active_TK, capacity: int | None, E: int, num_groups: int):
    """(keep_TK, can_drop): the active assignments that find a slot in their (group, expert) queue."""
    T = group_T.shape[0]
    can_drop = capacity is not None and capacity < T // num_groups  # Python ints: no data involved
    if not can_drop:
        # A token picks an expert at most once, so a queue never exceeds the group's token count:
        # nothing can drop (always the case at decode, where groups hold one token).
        return active_TK.clone(), False
    pos_TK = queue_positions(expert_TK, group_T, active_TK, E, num_groups)
    return active_TK & (pos_TK < capacity), True


def _router_losses(logits_TE, probs_TE, expert_TK, mask_T, num_groups: int):
    """(load-balance loss, z-loss). They see every routed token of the group, the t5x zero tokens
    included (as in Jax), but not tokens masked as padding."""
    w_T = mask_T.float()
    aux = load_balance_loss(probs_TE, expert_TK, w_T, num_groups)
    z = (torch.logsumexp(logits_TE, dim=-1) ** 2 * w_T).sum() / w_T.sum().clamp_min(1.0)
    return aux, z


def keep_second_at_random(probs_TE: torch.Tensor, expert_TK: torch.Tensor, threshold: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """[T, 2] bool: the first choice always; the second iff u < g2 / threshold, u ~ U[0, 1) per
    token, g2 = p2 / (p1 + p2 + 1e-9) its weight normalised over the two choices: Mesh
    TensorFlow's `second_policy="random"` (moe.py, default threshold 0.2; GShard's 2 * g2 is
    threshold 0.5). A dropped second choice takes no capacity slot (it leaves before the queue,
    as there). One draw per token, on the device: no host sync."""
    p_TK = probs_TE.gather(1, expert_TK)
    g2_T = p_TK[:, 1] / (p_TK[:, 0] + p_TK[:, 1] + 1e-9)
    u_T = torch.rand(g2_T.shape, generator=generator, device=g2_T.device, dtype=g2_T.dtype)
    return torch.stack([torch.ones_like(u_T, dtype=torch.bool), u_T < g2_T / threshold], dim=-1)
