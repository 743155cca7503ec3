"""Process groups as values, never globals: a 2-D DeviceMesh (dp, ep) and the groups the
training step needs, built once by the launcher and passed down.

Two rank-to-mesh mappings (ColossalAI's `use_ep_inside`), the same math on other wires:
  ep_inside=True (default, ColossalAI's default): rank r sits at (dp = r // ep, ep = r % ep): an
    EP group is `ep` consecutive ranks (the fast, intra-node dimension under torchrun); the ranks
    holding replicas of the same experts (the dp group) stride across nodes.
  ep_inside=False (EZ-MoE's "EP across nodes, ZeRO inside"): rank r sits at (dp = r % dp,
    ep = r // dp): a dp group (the ZeRO/FSDP2 shards of one EP block) is `dp` consecutive ranks,
    inside a node; the EP group, and its all_to_all, strides across nodes.
Either way the mesh is (dp, ep) with names ("dp", "ep"), so every user of `mesh["dp"]`,
`mesh.get_group("ep")` and DTensor placements over (dp, ep) is unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    world: int = 1
    rank: int = 0
    ep: int = 1
    dp: int = 1
    mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh
    world_group: dist.ProcessGroup | None = None
    ep_group: dist.ProcessGroup | None = None  # ranks that split the experts between them
    dp_group: dist.ProcessGroup | None = None  # ranks that hold the same experts
    # mesh's ranks ordered (ep, dp), over the same groups: FSDP-sharded experts as global DTensors
    # (checkpoints); built on first use by parallel.fsdp.expert_mesh
    expert_mesh: object | None = field(default=None, repr=False, compare=False)
    ep_inside: bool = True  # EP groups are consecutive ranks (False: dp groups are)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(ep: int = 1, backend: str | None = None, timeout_s: float = 600.0,
                     ep_inside: bool = True) -> ParallelState:
    """From torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT); one process otherwise.
    The timeout turns a dead peer into an error instead of a hang."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if ep != 1:
            raise ValueError(f"ep={ep} needs at least {ep} processes (launch with torchrun)")
        return ParallelState()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return build_state(ep, ep_inside)


def rank_grid(world: int, ep: int, ep_inside: bool = True) -> torch.Tensor:
    """[dp, ep] long: grid[d, e] = the rank at (dp = d, ep = e); see the module docstring."""
    dp = world // ep
    if ep_inside:
        return torch.arange(world).view(dp, ep)
    return torch.arange(world).view(ep, dp).t().contiguous()


def build_state(ep: int, ep_inside: bool = True) -> ParallelState:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    world, rank = dist.get_world_size(), dist.get_rank()
    if ep < 1 or world % ep:
        raise ValueError(f"ep={ep} must divide the world size {world}")
    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    if ep_inside:
        mesh = init_device_mesh(device, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    else:
        mesh = DeviceMesh(device, rank_grid(world, ep, ep_inside=False), mesh_dim_names=("dp", "ep"))
    return ParallelState(world=world, rank=rank, ep=ep, dp=world // ep, mesh=mesh,
                         world_group=dist.group.WORLD, ep_group=mesh.get_group("ep"),
                         dp_group=mesh.get_group("dp"), ep_inside=ep_inside)
