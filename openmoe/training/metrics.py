"""Training metrics: FLOPs per token for MFU, expert load, and sinks (JSONL, TensorBoard)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def token_share(name: str, p: torch.Tensor, cfg) -> float:
    """How many of p's elements one token passes through. A stacked expert weight is
    [experts held here, ...]: all E of them, or E/ep under expert parallelism (FSDP's DTensor
    reports its shape over the dp shards), and a token uses k experts' worth of it, so the count
    is k x one expert's size whatever the sharding. Anything else: all of it."""
    if ".mlp.experts." not in name:
        return p.numel()
    if p.dim() >= 3:
        return cfg.num_experts_per_tok * (p.numel() // p.shape[0])
    return p.numel() * cfg.num_experts_per_tok / cfg.num_experts  # e.g. an adapter over all E


def active_params(model) -> int:
    """Parameters one token passes through: all but the embedding table, each MoE layer's
    experts counted k of E (sharded or not)."""
    return int(sum(token_share(name, p, model.config) for name, p in model.named_parameters()
                   if not name.startswith("model.embed_tokens.")))


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active parameters + attention scores and values
    (12 x layers x heads*head_dim x seq), as in the PaLM appendix."""
    cfg = model.config
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return 6 * active_params(model) + attn


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float, world: int = 1) -> float:
    """Model FLOPs utilisation per device: tokens_per_s counts every rank's tokens, peak_flops is
    one device's."""
    return tokens_per_s * flops_per_token / (peak_flops * world)


def expert_stats(tokens_per_expert: torch.Tensor, dropped: torch.Tensor) -> dict:
    """Per MoE layer: max/mean load (1.0 = balanced) and drop rate."""
    t = tokens_per_expert.float()
    mean = t.mean(dim=1).clamp_min(1e-9)
    return {"expert_load_max_over_mean": [round(x, 3) for x in (t.max(dim=1).values / mean).tolist()],
            "drop_rate": [round(x, 4) for x in dropped.float().tolist()],
            "tokens_per_expert": t.long().tolist()}


class MetricsSink:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
