"""Expert parallelism: each rank of an EP group holds E/ep experts; tokens travel to them with
all_to_all_single (uneven splits, counts exchanged first) and come back the same way.

Only dispatch and combine change: routing and capacity run on each rank's own tokens before
dispatch, exactly as on one process, so results do not depend on the EP size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single as a2a  # differentiable

from ..moe.dispatch import DispatchPlan, LocalDispatcher
from ..moe.router import Routing


@dataclass
class EPExchange:
    send_splits: list[int]  # rows this rank sends to each EP rank
    recv_splits: list[int]  # rows this rank receives from each EP rank
    perm: torch.Tensor  # received rows (source-major) -> local-expert-major order
    local_counts: torch.Tensor  # rows per local expert after the exchange


class AllToAllDispatcher(LocalDispatcher):
    """Physical expert slots [rank * E_l, (rank + 1) * E_l) live on EP rank `rank`;
    `placement[e]` is the slot of logical expert e (identity until the balancer moves experts).
    Routing stays in logical ids: only where an expert's weights live changes."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.ep:
            raise ValueError(f"expert parallelism: {num_experts} experts do not split over ep={self.ep} ranks")
        self.local_experts = num_experts // self.ep
        self.placement = torch.arange(num_experts)

    def plan(self, routing: Routing, num_experts: int) -> DispatchPlan:
        physical = dataclasses.replace(routing, expert_TK=self.placement.to(routing.expert_TK.device)[routing.expert_TK])
        plan = super().plan(physical, num_experts)  # sorted by physical slot
        send_SE = plan.counts_E.view(self.ep, self.local_experts)
        recv_SE = torch.empty_like(send_SE)
        dist.all_to_all_single(recv_SE, send_SE.contiguous(), group=self.group)  # counts first
        src = torch.arange(self.ep).repeat_interleave(self.local_experts)
        exp = torch.arange(self.local_experts).repeat(self.ep)
        flat = recv_SE.reshape(-1)
        key = (exp * self.ep + src).repeat_interleave(flat)  # order rows by (local expert, source)
        plan.exchange = EPExchange(
            send_splits=send_SE.sum(1).tolist(), recv_splits=recv_SE.sum(1).tolist(),
            perm=torch.argsort(key, stable=True), local_counts=recv_SE.sum(0))
        return plan

    def dispatch(self, x_TH: torch.Tensor, plan: DispatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
        ex = plan.exchange
        rows = x_TH[plan.token_N]
        out = rows.new_empty(sum(ex.recv_splits), rows.shape[1])
        recv = a2a(out, rows, ex.recv_splits, ex.send_splits, group=self.group)
        return recv[ex.perm], ex.local_counts

    def combine(self, y_NH: torch.Tensor, plan: DispatchPlan, out_dtype: torch.dtype) -> torch.Tensor:
        ex = plan.exchange
        back = torch.empty_like(y_NH).index_copy(0, ex.perm, y_NH)  # undo the local-expert order
        out = y_NH.new_empty(sum(ex.send_splits), y_NH.shape[1])
        y_rows = a2a(out, back, ex.send_splits, ex.recv_splits, group=self.group)
        return super().combine(y_rows, plan, out_dtype)


def shard_experts(model: torch.nn.Module, group: dist.ProcessGroup) -> int:
    """Keep only this EP rank's experts in every MoE layer and route through all_to_all.
    Returns the number of MoE layers changed. Expert parameters get `_ep_expert = True`."""
    from ..moe.layer import MoELayer

    n = 0
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        disp = AllToAllDispatcher(group, layer.num_experts)
        lo, hi = disp.rank * disp.local_experts, (disp.rank + 1) * disp.local_experts
        ex = layer.experts
        for name in ("wi_gate", "wi_up", "wo"):
            full = getattr(ex, name)
            local = torch.nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad)
            local._ep_expert = True
            setattr(ex, name, local)
        ex.num_experts = disp.local_experts
        layer.dispatcher = disp
        n += 1
    return n
