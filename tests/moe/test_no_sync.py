"""No host-device synchronisation in routing, dispatch, experts and combine: every policy, forward
and backward. On CPU the calls that would synchronise on a GPU (.item(), .tolist(), bool(),
int(), float(), nonzero, data-sized bincount / boolean indexing through them) are patched to
raise; on CUDA the same runs under torch.cuda.set_sync_debug_mode("error")."""

import contextlib

import pytest
import torch

from openmoe import OpenMoeForCausalLM
from openmoe.moe import CapacityPolicy, MoELayer

SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@contextlib.contextmanager
def no_host_sync():
    saved = {n: getattr(torch.Tensor, n) for n in SYNCING}

    def refuse(name):
        def f(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} reached")
        return f

    for n in SYNCING:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_the_patch_catches_a_sync():
    with no_host_sync(), pytest.raises(AssertionError, match="Tensor.item"):
        torch.ones(2).sum().item()
    with no_host_sync(), pytest.raises(AssertionError, match="__bool__"):
        if torch.ones(1):
            pass


POLICIES = ["t5x", "colossalai", "dropless"]


@pytest.mark.parametrize("masked", [False, True], ids=["all-tokens", "padding-mask"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("experts", ["openmoe", "swiglu", "mlp"])
def test_moe_layer_forward_backward_without_sync(policy, masked, experts):
    layer = MoELayer(16, 4, 2, experts=experts, intermediate_size=16, capacity=CapacityPolicy(policy),
                     aux_loss=0.01, z_loss=0.001, experts_implementation="grouped_mm").train()
    x = torch.randn(2, 24, 16, requires_grad=True)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, :5] = False
    with no_host_sync():
        y, out = layer(x, mask if masked else None)
        (y.square().mean() + out.loss).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if policy == "t5x":
        assert out.dropped_fraction > 0  # the masked (dropped-row) path ran


@pytest.mark.parametrize("policy", POLICIES)
def test_model_training_step_without_sync(tiny, policy):
    model = OpenMoeForCausalLM(tiny(capacity_policy=policy, experts_implementation_name="grouped_mm")).train()
    ids = torch.randint(3, 97, (2, 32))
    with no_host_sync():
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("policy", POLICIES)
def test_cuda_training_step_under_sync_debug_mode(tiny, policy, dtype):
    """bf16, the GPU training dtype. (float32 is not checked: torch 2.11's CUDA grouped_mm runs
    float32 as a host loop over the groups, a sync inside torch; seen on an H200.)"""
    model = OpenMoeForCausalLM(tiny(capacity_policy=policy)).cuda().train()
    ids = torch.randint(3, 97, (2, 32), device="cuda")
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # warm-up (lazy inits may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
