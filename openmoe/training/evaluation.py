"""Held-out evaluation during training and `--eval_only`: the mean next-token cross-entropy of
each eval source over the same fixed batches every time, and its perplexity."""

from __future__ import annotations

import math

import torch

from ..data import IGNORE, PackedMixture


def draw_eval_batches(sources, encode, cfg, global_batch: int, bos_id: int, eos_id: int) -> dict[str, list[dict]]:
    """The first cfg.eval_batches global batches of every eval source, drawn once by the caller and
    reused, so every evaluation scores the same rows."""
    out = {}
    for src in sources:
        mix = PackedMixture([src], encode, cfg.seq_len, global_batch, cfg.seed, bos_id=bos_id, eos_id=eos_id)
        try:
            out[src.name] = [mix.next_batch() for _ in range(cfg.eval_batches)]
        finally:
            mix.close()
    return out


@torch.no_grad()
def evaluate(model, batches_by_name: dict[str, list[dict]], rows: slice, device: str, amp_dtype: torch.dtype,
             all_sum) -> dict:
    """Per source: `eval/<name>/loss`, the mean cross-entropy over every target token of its
    batches (this rank scores `rows` of each global batch; all_sum adds the ranks' sums), and
    `eval/<name>/ppl` = exp(loss). The model is in eval mode meanwhile, then as it was."""
    was_training = model.training
    model.eval()
    res = {}
    try:
        for name, batches in batches_by_name.items():
            total = count = 0.0
            for gb in batches:
                b = {k: v[rows].to(device) for k, v in gb.items()}
                n = int((b["labels"][:, 1:] != IGNORE).sum())
                with torch.autocast(device, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                    out = model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"],
                                use_cache=False)
                if n:
                    total += float(out.lm_loss) * n
                    count += n
            total, count = all_sum([total, count])
            loss = total / max(count, 1.0)
            res[f"eval/{name}/loss"] = loss
            res[f"eval/{name}/ppl"] = math.exp(min(loss, 700.0))
    finally:
        model.train(was_training)
    return res
