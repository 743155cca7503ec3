"""The language-model loss and OpenMoE's output z-loss from one log-sum-exp.

    lm_loss  = sum_n w_n * (lse_n - logit_n[target_n])     (cross-entropy, next-token targets)
    z_loss   = mean over targeted positions of lse_n^2     (reference: output z-loss)

Computed separately (log_softmax for the cross-entropy, logsumexp again for the z-loss, a
shifted copy of the logits for both) they make four or five passes over the [tokens, vocab]
float32 logits and keep as many temporaries of that size; OpenMoE's vocabulary is 256k, so one
such tensor is 1 GiB per 1k tokens. Here the forward reads the logits once for the log-sum-exp
and keeps nothing new of that size; the backward builds the one gradient tensor in place:

    d/dlogits = softmax * (g_lm * w_n + g_z * 2 * lse_n / n_targets) - g_lm * w_n * onehot(target)
"""

from __future__ import annotations

import torch


class _LMAndZLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV, target_N, w_lm_N, w_z_N):
        lse_N = torch.logsumexp(logits_NV, dim=-1)
        tgt_N = logits_NV.gather(1, target_N[:, None]).squeeze(1)
        ctx.save_for_backward(logits_NV, target_N, w_lm_N, w_z_N, lse_N)
        return (w_lm_N * (lse_N - tgt_N)).sum(), (w_z_N * lse_N * lse_N).sum()

    @staticmethod
    def backward(ctx, g_lm, g_z):
        logits_NV, target_N, w_lm_N, w_z_N, lse_N = ctx.saved_tensors
        scale_N = g_lm * w_lm_N + g_z * 2.0 * w_z_N * lse_N
        grad = logits_NV - lse_N[:, None]  # the one [N, V] allocation: softmax built in place
        grad.exp_().mul_(scale_N[:, None])
        grad.scatter_add_(1, target_N[:, None], (-g_lm * w_lm_N)[:, None])
        return grad, None, None, None


def lm_and_z_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, num_items_in_batch=None,
                  ignore_index: int = -100, shift_labels: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, output z-loss) of float32 logits against next-token labels, with HF's
    conventions: position s predicts labels[s + 1] (or `shift_labels[s]` when given), labels equal
    to ignore_index count nowhere, the cross-entropy is the mean over targets or the sum divided
    by `num_items_in_batch` (gradient accumulation); the z-loss is the mean over targets."""
    V = logits_BSV.shape[-1]
    if shift_labels is None:  # shift the labels, not the logits: no copy of the logits
        shift_labels = torch.nn.functional.pad(labels_BS, (0, 1), value=ignore_index)[..., 1:]
    target_N = shift_labels.reshape(-1).to(logits_BSV.device)
    valid_N = target_N != ignore_index
    n_valid = valid_N.sum().clamp_min(1).to(logits_BSV.dtype)
    denom = n_valid if num_items_in_batch is None else torch.as_tensor(
        num_items_in_batch, dtype=logits_BSV.dtype, device=logits_BSV.device)
    w_valid = valid_N.to(logits_BSV.dtype)
    return _LMAndZLoss.apply(logits_BSV.reshape(-1, V), torch.where(valid_N, target_N, 0),
                             w_valid / denom, w_valid / n_valid)
