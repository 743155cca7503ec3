"""FSDP2 (torch.distributed.fsdp.fully_shard) for the whole model: what is sharded over what.

World = dp x ep ranks; rank r sits at (dp = r // ep, ep = r % ep) (openmoe/parallel/mesh.py).

  Non-expert parameters (attention, dense/extra MLPs, routers, norms, embedding, lm_head):
    sharded over ALL `world` ranks (a 1-D "fsdp" mesh), one FSDP unit per decoder layer plus
    the root. Their gradients are reduce-scattered as the average over all ranks (FSDP2's
    default), which is the right rule for a replicated parameter.

  Expert parameters (`layer.experts` of every MoE layer; hierarchical sharding, ColossalAI's
  EZ-MoE): first split by EP (each EP rank keeps its E_l = E / ep experts, shard_experts),
  then, with shard_experts=True (TrainConfig.fsdp_experts) and dp > 1, each EP-local
  [E_l, ...] block is sharded by FSDP2 over the dp submesh (`ps.mesh["dp"]`: the ranks that
  hold replicas of the same experts), one FSDP unit per experts module, on dim 0 with
  torch.chunk semantics: the rank at (dp = d, ep = e) keeps rows chunk d of EP block e
  (FSDP2 pads when E_l % dp != 0). The unit all-gathers the block over dp only when the
  experts module runs, and reduce-scatters its gradient over dp only: the sum over the dp
  replicas divided by `world` (gradient divide factor = world, not FSDP2's default dp), the
  same rule grads.sync_gradients applies to unsharded experts. Never reduced over the EP
  group, never divided twice. With shard_experts=False (or dp == 1) the experts stay out of
  FSDP, replicated over dp, and sync_gradients reduces them.

  At ep = 1 the dp group is the whole world: the experts are then sharded over all ranks like
  the rest (divide factor world = dp, FSDP2's own average).

Mixed precision for every unit: parameters gathered in the compute dtype, gradients reduced in
fp32, fp32 master shards in the optimizer. On NCCL the expert division rides on the
reduce-scatter (PREMUL_SUM 1/world); gloo has no PREMUL_SUM, so on CPU the units reduce with
SUM and divide the reduced shard by world afterwards (same result).

Hybrid sharding (HSDP, 1 < shard_size = k < world, k dividing world): the non-expert units are
sharded over groups of k consecutive ranks and replicated over the world / k such groups, on a
2-D (replicate, shard) mesh (rank r at (r // k, r % k)); parameters are DTensors with placements
[Replicate(), Shard(0)]. FSDP2 reduce-scatters each unit's gradient over the shard group and
all-reduces the shard over the replicate group: the sum over all ranks, divided by world (the
same average as full sharding). gloo (torch 2.13) runs both collectives on CPU, with FSDP2's
default AVG ops too (checked); the CPU path nonetheless uses SUM and divides the reduced shard
by world afterwards (force_sum_reduction_for_comms), like the expert units, so only SUM is
needed. In hybrid mode the experts stay out of FSDP (split by EP, replicated over dp, reduced
by grads.sync_gradients), whatever shard_experts says.

The experts module must be called as a module (the dispatcher's `experts(x, counts)`), so the
unit's pre-forward all-gather runs; the 'gather'/'auto' expert layouts, which read the stacked
weights directly, are refused here (and must not be switched on afterwards).

Sharded experts are DTensors on the 1-D dp mesh with shape [E_l, ...] (EP-local). The
checkpoint sees them through `global_expert`: a DTensor of the global [E, ...] shape on the
same ranks ordered (ep, dp) with placements [Shard(0), Shard(0)], sharing the local storage.
The balancer all-gathers a block over dp, moves experts over EP, and keeps `local_rows`.
"""

from __future__ import annotations

import torch

from .layers import moe_layers
from .mesh import ParallelState


def block_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (decoder layers), one FSDP unit each: the outermost modules
    whose class HF names in `_no_split_modules` (what accelerate's device maps keep whole), so
    no attribute path such as `model.layers` is assumed."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(f"FSDP2: {type(model).__name__} names no block classes in _no_split_modules, so its "
                         f"decoder layers (one FSDP unit each) cannot be found")
    found, inside = [], set()
    for m in model.modules():
        if type(m).__name__ in names and id(m) not in inside:
            found.append(m)
            inside.update(id(c) for c in m.modules())  # nested blocks belong to this unit
    if not found:
        raise ValueError(f"FSDP2: no module of {type(model).__name__} is one of its _no_split_modules {sorted(names)}")
    return found


def check_shard_size(shard_size: int, world: int) -> None:
    """1 < shard_size <= world and dividing it (ValueError otherwise)."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 2 or world % shard_size:
        raise ValueError(f"fsdp={shard_size!r}: the FSDP2 shard group size must divide the world size {world} "
                         f"(1 = off, {world} = all ranks, in between = hybrid sharding groups)")


def dense_mesh(ps: ParallelState, shard_size: int, device: str):
    """The mesh of the non-expert units: 1-D over all ranks ("fsdp") when shard_size == world,
    else 2-D (replicate = world // k, shard = k), shard groups of k consecutive ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    if shard_size == ps.world:
        return init_device_mesh(device, (ps.world,), mesh_dim_names=("fsdp",))
    return init_device_mesh(device, (ps.world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def apply_fsdp(model: torch.nn.Module, ps: ParallelState, param_dtype: torch.dtype | None = None,
               shard_experts: bool = True, shard_size: int | None = None) -> None:
    """Shard `model` in place (see the module docstring); shard_size: the FSDP2 shard group size
    (default: world; 1 < k < world: hybrid sharding)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .expert_parallel import AllToAllDispatcher
    from .grads import is_expert, is_sharded

    k = ps.world if shard_size is None else shard_size
    check_shard_size(k, ps.world)
    hybrid = k < ps.world
    p0 = next(model.parameters())  # a meta model: the mesh's device (materialised there later)
    device = ps.mesh.device_type if p0.is_meta else ("cuda" if p0.is_cuda else "cpu")
    world_mesh = dense_mesh(ps, k, device)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    moe = [m for _, m in moe_layers(model)]
    if shard_experts and ps.dp > 1 and not hybrid:
        dp_mesh = ps.mesh["dp"]
        for layer in moe:
            disp = layer.dispatcher
            if isinstance(disp, AllToAllDispatcher) and disp.layout.layout != "ep":
                raise ValueError(f"expert layout {disp.layout.layout!r} (experts all-gathered over the EP group) "
                                 f"cannot run on FSDP-sharded experts; use the 'ep' layout or fsdp_experts=False")
            ex = layer.experts
            marked = {name for name, p in ex.named_parameters() if is_expert(p)}
            fully_shard(ex, mesh=dp_mesh, mp_policy=mp)
            # FSDP2 reduce-scatters over dp: sum over the replicas, then / world (not / dp).
            ex.set_gradient_divide_factor(float(ps.world))
            if device != "cuda":  # gloo has no PREMUL_SUM: plain SUM, then the division
                ex.set_force_sum_reduction_for_comms(True)
            for name, p in ex.named_parameters():  # fully_shard made new (DTensor) Parameters
                if name in marked:
                    p._ep_expert = True
    # experts not sharded above stay out of FSDP (replicated over dp, reduced by sync_gradients);
    # sharded ones belong to their own unit, which the outer units skip
    ignored = {p for m in moe for p in m.experts.parameters() if not is_sharded(p)}
    units = block_modules(model) + [model]
    for unit in units:
        fully_shard(unit, mesh=world_mesh, mp_policy=mp, ignored_params=ignored)
    if hybrid and device != "cuda":  # CPU/gloo: SUM collectives only, then / world
        for unit in units:
            unit.set_force_sum_reduction_for_comms(True)


def expert_mesh(ps: ParallelState):
    """ps.mesh's ranks ordered (ep, dp): mesh[e, d] = the rank at (dp = d, ep = e), built on the
    existing ep and dp process groups (no new groups), so DTensors over it can communicate.
    Built once per ParallelState and kept on it (ps.expert_mesh)."""
    from torch.distributed.device_mesh import DeviceMesh

    if ps.expert_mesh is None:
        ps.expert_mesh = DeviceMesh.from_group([ps.mesh.get_group("ep"), ps.mesh.get_group("dp")],
                                               ps.mesh.device_type, mesh=ps.mesh.mesh.t().contiguous(),
                                               mesh_dim_names=("ep", "dp"))
    return ps.expert_mesh


def global_expert(t, ps: ParallelState):
    """An EP-local expert tensor sharded over dp ([E_l, ...] DTensor on the dp mesh) as the global
    [E, ...] DTensor it is a piece of: (ep, dp) mesh, [Shard(0), Shard(0)], sharing t's local
    storage (so DCP saves from it and loads into it in place). Uneven shards (E_l % dp != 0)
    follow torch.chunk, as FSDP2's do; the global shape and stride are given explicitly."""
    from torch.distributed.tensor import DTensor, Shard

    shape = torch.Size((t.shape[0] * ps.ep, *t.shape[1:]))
    stride = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * shape[i + 1]
    return DTensor.from_local(t.to_local(), expert_mesh(ps), [Shard(0), Shard(0)], run_check=False,
                              shape=shape, stride=tuple(stride))


def local_rows(n: int, ps: ParallelState) -> tuple[int, int]:
    """Rows [lo, hi) of an EP-local [n, ...] block that this rank's dp shard holds (torch.chunk)."""
    import torch.distributed as dist

    d = dist.get_rank(ps.dp_group) if ps.dp > 1 else 0
    c = -(-n // ps.dp)
    lo = min(d * c, n)
    return lo, min(lo + c, n)
