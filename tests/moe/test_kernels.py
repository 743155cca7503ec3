"""openmoe/moe/kernels.py: the grouped GEMM and its compile-safe custom op against a per-group
loop written here, forward and backward; rows past the last group are ignored. The kernel
chooser and the backend registry by hand."""

import pytest
import torch

from openmoe.moe.experts import expert_of_rows, group_offsets
from openmoe.moe.kernels import grouped_mm, grouped_mm_op


def _reference(x, w, counts):
    """y[rows of e] = x[rows of e] @ w[e], one torch.mm per group; rows past the groups: 0."""
    y, start = x.new_zeros(x.shape[0], w.shape[-1]), 0
    for e, n in enumerate(counts):
        y[start:start + n] = x[start:start + n] @ w[e]
        start += n
    return y


COUNTS = [3, 0, 5, 2]  # an empty expert, and 2 rows past the last group (N = 12)


def _inputs(dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(12, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 8, 16, dtype=dtype, requires_grad=True)
    return x, w, group_offsets(torch.tensor(COUNTS))


@pytest.mark.parametrize("fn", [grouped_mm, grouped_mm_op], ids=["grouped_mm", "custom_op"])
def test_forward_backward_equal_the_per_group_loop(fn):
    x, w, offs = _inputs()
    g = torch.randn(12, 16)
    g[10:] = 0  # the rows past the groups carry no gradient (the dispatcher masks them)
    fn(x, w, offs).backward(g)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    _reference(xr, wr, COUNTS).backward(g)
    y = fn(x.detach(), w.detach(), offs)
    torch.testing.assert_close(y[:10], _reference(x.detach(), w.detach(), COUNTS)[:10])
    torch.testing.assert_close(x.grad[:10], xr.grad[:10])
    torch.testing.assert_close(w.grad, wr.grad)  # the empty expert's gradient is exactly 0
    assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiles_fullgraph_in_fp32_and_bf16(dtype):
    """inductor's grouped_mm rejects float32 at trace time; the custom op takes it (aot_eager: the
    same tracing and fake-tensor checks as inductor, without code generation)."""
    x, w, offs = _inputs(dtype)
    g = torch.randn(12, 16, dtype=dtype)
    g[10:] = 0
    compiled = torch.compile(grouped_mm, fullgraph=True, backend="aot_eager")
    y = compiled(x, w, offs)
    y.backward(g)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    grouped_mm(xr, wr, offs).backward(g)
    torch.testing.assert_close(y[:10], grouped_mm(x.detach(), w.detach(), offs)[:10])
    torch.testing.assert_close(x.grad[:10], xr.grad[:10])
    torch.testing.assert_close(w.grad, wr.grad)


def test_expert_of_rows_by_hand():
    # counts [3, 0, 5, 2] -> rows 0-2 expert 0, 3-7 expert 2, 8-9 expert 3, 10-11 past the groups (4)
    assert expert_of_rows(torch.tensor(COUNTS), 12).tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 3, 3, 4, 4]


def test_choose_kernel_by_hand():
    """The one chooser: "auto" by device and dtype, grouped_mm only where every operand's rows are
    16-byte aligned in the compute dtype, explicit kernels and backend names as they are."""
    from openmoe.moe.kernels import choose_kernel

    x32, w32 = torch.zeros(3, 8), torch.zeros(2, 8, 4)  # 4 fp32 = 16 bytes: aligned
    w_odd = torch.zeros(2, 8, 6)  # 6 fp32 = 24 bytes: not
    assert choose_kernel("auto", x32, [w32], torch.float32) == "grouped_mm"
    assert choose_kernel("auto", x32, [w32], torch.bfloat16) == "eager"  # CPU bf16: the loop, measured faster
    assert choose_kernel("auto", x32, [w32, w_odd], torch.float32) == "eager"
    assert choose_kernel("grouped_mm", x32, [w_odd], torch.float32) == "eager"  # same math, the reference
    assert choose_kernel("grouped_mm", x32, [torch.zeros(2, 8, 8)], torch.bfloat16) == "grouped_mm"
    assert choose_kernel("grouped_mm", x32, [w32], torch.bfloat16) == "eager"  # 4 bf16 = 8 bytes
    assert choose_kernel("eager", x32, [w32], torch.float32) == "eager"
    assert choose_kernel("my_backend", x32, [w32], torch.float32) == "my_backend"


def test_implementation_names_are_checked_against_one_registry(monkeypatch):
    """Names an experts `implementation` takes: "auto", the kernels, registered backends; nothing else."""
    from openmoe.moe import MoELayer
    from openmoe.moe.kernels import EXPERT_BACKENDS, KERNELS, check_implementation, register_expert_backend

    assert tuple(EXPERT_BACKENDS)[:2] == KERNELS
    with pytest.raises(ValueError, match="implementation 'mine'"):
        MoELayer(8, 4, 2, experts="openmoe", experts_implementation="mine")
    monkeypatch.setitem(EXPERT_BACKENDS, "mine", EXPERT_BACKENDS["eager"])
    check_implementation("mine")
    MoELayer(8, 4, 2, experts="swiglu", experts_implementation="mine")(torch.randn(3, 8))
    with pytest.raises(ValueError, match="'auto'"):
        register_expert_backend("auto", EXPERT_BACKENDS["eager"])


def test_lora_backend_is_registered_where_it_is_used_not_on_import(monkeypatch):
    """The registry does not depend on what was imported before: use_lora_backend registers the
    backend it switches the experts to."""
    from openmoe.moe.expert_types import OpenMoeExperts
    from openmoe.moe.kernels import EXPERT_BACKENDS
    from openmoe.peft import expert_lora

    monkeypatch.delitem(EXPERT_BACKENDS, expert_lora.BACKEND, raising=False)  # as if never imported
    ex = OpenMoeExperts(4, 8, 8)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_()
    x, counts = torch.randn(5, 8), torch.tensor([1, 2, 0, 2])
    want = ex(x, counts)
    expert_lora.use_lora_backend(ex)  # no adapters: the frozen stacks only
    assert ex.implementation == expert_lora.BACKEND
    torch.testing.assert_close(ex(x, counts), want)
