"""Process groups as values, never globals: a 2-D DeviceMesh (dp, ep) and the groups the
training step needs, built once by the launcher and passed down.

Rank r sits at (dp = r // ep, ep = r % ep): an EP group is `ep` consecutive ranks (the fast,
intra-node dimension under torchrun); the ranks holding replicas of the same experts form the
dp group.
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

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(ep: int = 1, backend: str | None = None, timeout_s: float = 600.0) -> ParallelState:
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
    return build_state(ep)


def build_state(ep: int) -> ParallelState:
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = dist.get_world_size(), dist.get_rank()
    if ep < 1 or world % ep:
        raise ValueError(f"ep={ep} must divide the world size {world}")
    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    return ParallelState(world=world, rank=rank, ep=ep, dp=world // ep, mesh=mesh,
                         world_group=dist.group.WORLD, ep_group=mesh.get_group("ep"),
                         dp_group=mesh.get_group("dp"))
