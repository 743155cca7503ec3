"""Bytes a training step keeps for the backward, per token and per layer, for OpenMoE's forward
as this repository computes it.

The counts follow what autograd saves (checked tensor by tensor with saved-tensor hooks in
tests/planner/test_activations.py), so they depend on what is trained:
  - an op saves an input only when a gradient needs it: a frozen Linear keeps nothing, a
    trained or LoRA-adapted one keeps its input (under bf16 autocast, its own bf16 copy of it,
    because the master weights, or the fp32 LoRA weights, make autocast cast the input);
  - nothing before the first trained weight is in the graph at all (LoRA on the experts only
    keeps nothing for the layers before the first MoE layer);
  - RMSNorm keeps its input in fp32 (or its fp32 copy) and 1/rms, plus the normalised input when
    its weight trains; the gated MLP keeps 2I + 3I (gate, silu, a * silu, up) and the down
    projection's input I; attention keeps q, k, v, the output (4 x A) and the log-sum-exp;
  - the experts run in the compute dtype: under autocast grouped_mm casts to autocast's dtype
    (openmoe/moe/experts.py: compute_dtype), as torch.matmul would; LoRA runs them in the base dtype;
  - the combine keeps a row index and weight per assignment (and the fp32 expert outputs when the
    router trains);
  - the loss keeps the fp32 logits and their log-softmax: 8 V bytes per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..moe.router import colossalai_capacity, t5x_capacity, t5x_num_groups


@dataclass
class Needs:
    """What the gradient needs in one layer: weights trained (full) or adapted (LoRA)."""

    trained: set = field(default_factory=set)  # leaves whose weight trains or carries LoRA
    lora: dict = field(default_factory=dict)  # leaf -> LoRA rank on it (0 = none)
    norms_train: bool = False

    def __call__(self, leaf: str) -> bool:
        return leaf in self.trained

    def any(self, *leaves: str) -> bool:
        return any(leaf in self.trained for leaf in leaves)


def kept_assignments(config, tokens: int, training: bool = True) -> int:
    """Upper bound on the assignments the experts compute for `tokens` tokens: k per token,
    capped by the capacity policy's slots (t5x groups / colossalai / dropless)."""
    E, k = config.num_experts, config.num_experts_per_tok
    cf = config.capacity_factor_train if training else config.capacity_factor_eval
    if config.capacity_policy == "dropless":
        return k * tokens
    if config.capacity_policy == "colossalai":
        return min(k * tokens, E * colossalai_capacity(tokens, E, k, cf, config.min_capacity))
    padded = -(-tokens // E) * E  # the t5x zero tokens that make E divide the count
    groups = t5x_num_groups(padded, config.router_group_size, E)
    cap = t5x_capacity(padded // groups, E, cf, config.min_capacity)
    return min(k * tokens, cap * E * groups)


class TokenBytes:
    """Saved bytes per token of each part of a layer. c: bytes of the compute dtype; full: full
    fine-tuning (fp32 master weights, autocast) rather than LoRA on a base in the compute dtype."""

    def __init__(self, config, c: int, full: bool, lora_dropout: float = 0.0):
        self.cfg, self.c, self.full, self.dropout = config, c, full, lora_dropout
        self.H = config.hidden_size
        self.A = config.num_attention_heads * config.head_dim
        self.I = config.intermediate_size
        self.e = c  # the experts' dtype (see the module docstring)

    def _input_copies(self, width: int, savers: int) -> int:
        """An fp32 norm output read by `savers` Linears that keep their input: shared in fp32,
        one bf16 copy each under autocast."""
        if not savers:
            return 0
        return 4 * width if self.c == 4 else 2 * width * savers

    def _lora(self, rank: int, width: int) -> int:
        """A LoRA Linear keeps x @ A (rank wide); with dropout, the mask and the dropped input."""
        if not rank:
            return 0
        return self.c * rank + ((1 + self.c) * width if self.dropout > 0 else 0)

    def norm(self, alive: bool, trains: bool, savers: int) -> int:
        if not (alive or trains):  # outside the graph: only the LoRA consumers' own input copies
            return self._input_copies(self.H, savers)
        return 4 * self.H + 4 + (4 * self.H if trains else 0) + self._input_copies(self.H, savers)

    def attention(self, alive: bool, n: Needs) -> int:
        alive = alive or n.any("q_proj", "k_proj", "v_proj")
        b = 4 * self.c * self.A + 4 * self.cfg.num_attention_heads if alive else 0
        if n("o_proj") and not self.full and self.c == 2:
            b += 2 * self.A  # the LoRA branch's own bf16 copy of the attention output
        return b + sum(self._lora(n.lora.get(p, 0), self.H if p != "o_proj" else self.A)
                       for p in ("q_proj", "k_proj", "v_proj", "o_proj"))

    def mlp(self, alive: bool, n: Needs) -> int:
        b = 5 * self.c * self.I if (alive or n.any("gate_proj", "up_proj")) else 0
        if n("down_proj"):
            b += self.c * self.I
        return b + sum(self._lora(n.lora.get(p, 0), self.H if p != "down_proj" else self.I)
                       for p in ("gate_proj", "up_proj", "down_proj"))

    def router(self, alive: bool, n: Needs) -> int:
        if not (alive or n("gate_weight")):
            return 0
        E, K = self.cfg.num_experts, self.cfg.num_experts_per_tok
        # probabilities, top-k bookkeeping and losses in fp32/int64 over [T, E] and [T, K]
        b = 16 * E + 60 + 16 * K + (2 * self.H if self.c == 2 else 0)
        return b + self._lora(n.lora.get("gate_weight", 0), self.H)

    def experts(self, alive: bool, n: Needs) -> int:
        """Per kept assignment."""
        if not (alive or n.any("wi_gate", "wi_up", "wo")):
            return 0
        e = self.e
        b = 5 * e * self.I + (e * self.H if n.any("wi_gate", "wi_up") else 0) + (e * self.I if n("wo") else 0)
        return b + sum(e * n.lora.get(p, 0) for p in ("wi_gate", "wi_up", "wo"))

    def combine(self, router_in_graph: bool) -> int:
        """Per kept assignment (openmoe/moe/dispatch.py: a gather, then weight and sum in fp32):
        the gather's row index and the fp32 weight, and the fp32 expert output when the router's
        weights need a gradient."""
        return 12 + (4 * self.H if router_in_graph else 0)

    def loss(self) -> int:
        # openmoe/losses.py keeps the fp32 logits and per token: log-sum-exp, target id and two
        # weights (no log-softmax copy)
        return 4 * self.cfg.vocab_size + 20
