"""Training metrics: FLOPs per token for MFU, expert load, evaluation, and sinks (JSONL,
TensorBoard, Weights & Biases).

MFU = executed FLOPs per second / peak FLOP/s of one device:
- executed FLOPs: `flops_per_token` (6 x active parameters + attention, every top-k assignment
  computed) minus the expert FLOPs of the assignments the capacity policy dropped (those rows
  are never computed). With a dropless policy the two are the same.
- the peak: `peak_tflops` when given, else `utils.hardware.measured_peak`: the best rate of
  square matmuls (several sizes, warmed up, the fastest of several timings) in the compute
  dtype on the training device, measured at start; if a logged window ever runs faster than
  that, the peak is measured again and the higher figure kept (see Trainer), so MFU <= 1 unless
  the model really beats a plain GEMM.
"""

from __future__ import annotations

import json
import os
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


def _named_params(model):
    """named_parameters with PEFT's `.base_layer` wrappers taken out of the names: a wrapped
    weight is counted where it sits in the model (a LoRA-wrapped router is still the router)."""
    return ((name.replace(".base_layer", ""), p) for name, p in model.named_parameters())


def active_params(model) -> int:
    """Parameters one token passes through: all but the embedding table, each MoE layer's
    experts counted k of E (sharded or not)."""
    return int(sum(token_share(name, p, model.config) for name, p in _named_params(model)
                   if not name.startswith("model.embed_tokens.")))


def expert_params(model) -> int:
    """The part of active_params in the routed experts (k per MoE layer)."""
    return int(sum(token_share(name, p, model.config) for name, p in _named_params(model)
                   if ".mlp.experts." in name))


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active parameters + attention scores and values
    (12 x layers x heads*head_dim x seq), as in the PaLM appendix. With a LoRA adapter (PEFT's
    `.lora_` weights) the frozen base costs 4 x its active parameters (forward and input
    gradients, no weight gradients) and the adapter 6 x the LoRA parameters a token passes through."""
    cfg = model.config
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    base = lora = 0
    for name, p in _named_params(model):
        if name.startswith("model.embed_tokens."):
            continue
        if ".lora_" in name:
            lora += token_share(name, p, cfg)
        else:
            base += token_share(name, p, cfg)
    if not lora:
        return 6 * active_params(model) + attn
    return 4 * base + 6 * lora + attn


def executed_flops(tokens: float, flops_per_token: float, expert_flops_per_token: float,
                   kept_fraction: float = 1.0) -> float:
    """FLOPs a step really ran: every token's FLOPs, less the expert FLOPs of the dropped
    assignments (kept_fraction = kept / routed assignments, over all MoE layers)."""
    return tokens * (flops_per_token - expert_flops_per_token * (1.0 - kept_fraction))


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float, world: int = 1) -> float:
    """Model FLOPs utilisation per device: tokens_per_s counts every rank's tokens, peak_flops is
    one device's."""
    return tokens_per_s * flops_per_token / (peak_flops * world)


def routed_per_expert(router_logits, top_k: int, num_experts: int) -> torch.Tensor:
    """[MoE layers, E] assignments the router made before any capacity limit, from each layer's
    router logits [T, E] (the same top-k rule as moe/router.py, ties to the lower index)."""
    from ..moe.router import top_k_experts

    rows = []
    for logits in router_logits:
        idx = top_k_experts(logits.detach().float(), top_k).reshape(-1)
        rows.append(torch.zeros(num_experts, dtype=torch.long, device=idx.device)
                    .scatter_add_(0, idx, torch.ones_like(idx)))
    return torch.stack(rows)


def _max_over_mean(t: torch.Tensor) -> list[float]:
    t = t.float()
    mean = t.mean(dim=1).clamp_min(1e-9)
    return [round(x, 3) for x in (t.max(dim=1).values / mean).tolist()]


def expert_stats(tokens_per_expert: torch.Tensor, dropped: torch.Tensor,
                 routed: torch.Tensor | None = None) -> dict:
    """Per MoE layer (lists, one entry per MoE layer):
    expert_load_max_over_mean  busiest expert / mean from the router's choices (before capacity;
                               1.0 = balanced), the kept counts when routed is not given;
    kept_load_max_over_mean    the same from kept assignments (capped by the capacity);
    drop_rate                  dropped / routed assignments;
    routed_per_expert, tokens_per_expert  the counts (routed, kept)."""
    kept = tokens_per_expert.long()
    out = {"expert_load_max_over_mean": _max_over_mean(routed if routed is not None else kept),
           "kept_load_max_over_mean": _max_over_mean(kept),
           "drop_rate": [round(x, 4) for x in dropped.float().tolist()],
           "tokens_per_expert": kept.tolist()}
    if routed is not None:
        out["routed_per_expert"] = routed.long().tolist()
    return out


def installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def missing_backends(tensorboard: bool, wandb: str | None) -> str | None:
    """The one-line reason a logger asked for cannot be used (None: all available)."""
    if tensorboard and not installed("tensorboard"):
        return ("tensorboard=true: the tensorboard package is not installed (pip install tensorboard, "
                "or --tensorboard false)")
    if wandb and not installed("wandb"):
        return f"wandb={wandb!r}: the wandb package is not installed (pip install wandb, or drop the wandb key)"
    return None


class MetricsSink:
    """metrics.jsonl (always), TensorBoard events and a Weights & Biases run when asked for.
    `start_step`: rows of steps after it are removed first (atomically): a resumed run rewrites
    the history from its checkpoint's step, a fresh run (0) starts an empty file, None appends."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = False, wandb: str | None = None,
                 start_step: int | None = 0, config: dict | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        why = missing_backends(tensorboard, wandb)
        if why:
            raise ValueError(why)
        if start_step is not None:  # None: append (an --eval_only row)
            self.rewind(start_step)
        self.tb = self.wb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        if wandb:
            import wandb as _wandb

            self.wb = _wandb.init(project=wandb, dir=str(out_dir), config=config, resume="allow")

    def rewind(self, step: int) -> None:
        """Keep only the rows of steps <= step (atomic: a temporary file renamed over it)."""
        if not self.path.exists():
            return
        from ..utils.cli import atomic_write_text

        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        scalars = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wb is not None:
            self.wb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()
