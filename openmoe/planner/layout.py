"""Parallel layouts the planner models, sizes as the table prints them (parsed by utils/sizes.py),
and checks of the planner's flags.

A layout is the trainer's: `world` ranks; `ep` of them split the experts between them (expert
parallelism, E / ep experts per rank, over dp = world / ep replicas); `fsdp` = world shards
every non-expert parameter (and its gradient and optimizer state) over all ranks with FSDP2
(openmoe/parallel/fsdp.py) and, with `fsdp_experts` (the trainer's default), each rank's expert
block over its dp replicas too (EZ-MoE), so experts are split world ways; fsdp = 1 replicates;
1 < fsdp < world (dividing it) is hybrid sharding (HSDP): non-expert parameters sharded over
groups of fsdp ranks and replicated over the world / fsdp groups, experts replicated over dp.
`ep_inside` picks which ranks form the groups (parallel/mesh.py, ColossalAI's use_ep_inside):
EP groups of consecutive ranks (default) or dp/ZeRO groups of consecutive ranks with EP strided
across nodes; memory per rank is the same either way, only the links each collective uses change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..utils.sizes import parse_size

__all__ = ["Layout", "candidate_layouts", "check_plan_fields", "default_world", "format_size", "parse_size"]


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Layout:
    world: int = 1
    ep: int = 1
    fsdp: int = 1
    fsdp_experts: bool = True
    ep_inside: bool = True  # EP groups of consecutive ranks (False: dp groups are, EP strided)

    @property
    def experts_fsdp_sharded(self) -> bool:
        return self.fsdp == self.world > 1 and self.fsdp_experts and self.dp > 1

    @property
    def hybrid(self) -> bool:
        return 1 < self.fsdp < self.world

    @property
    def dp(self) -> int:
        """Replicas of each expert."""
        return self.world // self.ep

    @property
    def dense_shard(self) -> int:
        return self.fsdp

    @property
    def expert_shard(self) -> int:
        return self.ep * (self.dp if self.experts_fsdp_sharded else 1)

    def check(self, num_experts: int | None = None) -> "Layout":
        for k in ("world", "ep", "fsdp"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{k}={v!r}: must be a positive integer")
        if self.world % self.fsdp:
            raise ValueError(f"fsdp={self.fsdp}: must divide world={self.world} (1 = off, {self.world} = all "
                             f"ranks, in between = hybrid sharding groups)")
        if self.world % self.ep:
            raise ValueError(f"world={self.world}: must be a multiple of ep={self.ep}")
        if num_experts is not None and num_experts % self.ep:
            raise ValueError(f"ep={self.ep}: does not divide the {num_experts} experts")
        return self

    def __str__(self) -> str:
        fsdp = f", FSDP2 over all {self.fsdp} ranks" if self.fsdp > 1 else ""
        if self.hybrid:
            fsdp = f", HSDP: FSDP2 over groups of {self.fsdp} ranks x {self.world // self.fsdp} replicas"
        if self.experts_fsdp_sharded:
            fsdp += f" (experts also over dp {self.dp})"
        if not self.ep_inside and self.ep > 1 and self.dp > 1:
            fsdp += "; EP strided across nodes, dp groups consecutive ranks"
        return f"world {self.world} = dp {self.dp} x ep {self.ep}{fsdp}"


def default_world() -> int:
    """Under torchrun the launcher's WORLD_SIZE; one process otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def candidate_layouts(num_experts: int, max_world: int = 1024, fsdp_options=(False, True)):
    """Layouts by growing world size (powers of two); within one size, those that need the
    least memory per rank first (FSDP2, then the widest EP)."""
    world = 1
    while world <= max_world:
        opts = [Layout(world, ep, world if f else 1) for f in fsdp_options for ep in _pow2_upto(world)
                if num_experts % ep == 0 and not (f and world == 1)]
        yield from sorted(opts, key=lambda l: (l.fsdp == 1, -l.ep))
        world *= 2


def _pow2_upto(n: int):
    v = 1
    while v <= n:
        yield v
        v *= 2


def check_plan_fields(cfg) -> None:
    """TrainConfig's planner fields; ValueError naming the flag."""
    if cfg.device_memory is not None:
        try:
            parse_size(cfg.device_memory)  # > 0
        except ValueError as e:
            raise ValueError(f"device_memory={cfg.device_memory!r}: {e}") from None
    if cfg.world is not None:
        if not isinstance(cfg.world, int) or cfg.world < 1:
            raise ValueError(f"world={cfg.world!r}: must be a positive integer")
        if not cfg.plan:
            raise ValueError(f"world={cfg.world}: --world is for --plan (a run takes WORLD_SIZE from torchrun)")
    if cfg.plan:
        Layout(cfg.world or default_world(), cfg.ep, cfg.fsdp, cfg.fsdp_experts).check()
