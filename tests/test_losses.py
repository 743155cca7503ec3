"""openmoe/losses.py: the fused cross-entropy + output z-loss against F.cross_entropy and a
direct logsumexp, values and gradients, in float64."""

import pytest
import torch
import torch.nn.functional as F

from openmoe.losses import lm_and_z_loss


def _reference(logits, labels, num_items=None):
    lg, lb = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    if num_items is None:
        ce = F.cross_entropy(lg, lb, ignore_index=-100)
    else:
        ce = F.cross_entropy(lg, lb, ignore_index=-100, reduction="sum") / num_items
    valid = lb != -100
    z = (torch.logsumexp(lg, -1) ** 2)[valid].mean()
    return ce, z


@pytest.mark.parametrize("num_items", [None, 13])
def test_values_and_gradients_match_the_separate_losses(num_items):
    torch.manual_seed(0)
    logits = (torch.randn(2, 7, 11, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.randint(0, 11, (2, 7))
    labels[0, 3] = labels[1, 5] = -100  # ignored targets
    ce, z = lm_and_z_loss(logits, labels, num_items)
    ce_ref, z_ref = _reference(logits, labels, num_items)
    torch.testing.assert_close(ce, ce_ref)
    torch.testing.assert_close(z, z_ref)
    g = torch.autograd.grad(ce + 0.37 * z, logits)[0]
    g_ref = torch.autograd.grad(ce_ref + 0.37 * z_ref, logits)[0]
    torch.testing.assert_close(g, g_ref)
    assert (g[:, -1] == 0).all()  # the last position has no target


def test_gradcheck():
    torch.manual_seed(1)
    logits = torch.randn(1, 4, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 2, -100, 4]])
    assert torch.autograd.gradcheck(lambda x: sum(lm_and_z_loss(x, labels)), (logits,))


def test_explicit_shift_labels_and_all_ignored():
    logits = torch.randn(1, 3, 5, dtype=torch.float64)
    shift = torch.tensor([[2, -100, 4]])
    ce, z = lm_and_z_loss(logits, None, shift_labels=shift)
    lg = logits[0, [0, 2]]
    torch.testing.assert_close(ce, F.cross_entropy(lg, torch.tensor([2, 4])))
    ce0, z0 = lm_and_z_loss(logits, torch.full((1, 3), -100))
    assert ce0.item() == 0 and z0.item() == 0  # no targets: zero, not NaN
