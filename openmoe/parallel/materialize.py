"""Materialise a model built on `meta` after it was parallelised (EP, FSDP2, HSDP): each rank
allocates only its own shards (to_empty) and fills them, as torchtitan does.

Fresh init is per tensor: parameter `name` gets its full value from a CPU generator seeded by
(seed, name), with the rule of OpenMoePreTrainedModel._init_weights for its owner module. So a
rank computes one full tensor at a time, keeps its slice, and drops the rest; 1 rank and N ranks
give the same weights. `init_from` reads each rank's slices straight from the safetensors files
(safe_open(...).get_slice): no full model in host memory.

The full -> local map of a parameter: expert stacks are first cut to this EP rank's experts
(dim 0, [rank * E_l, (rank + 1) * E_l)), then, for DTensors (FSDP2), to this rank's DTensor
shard (compute_local_shape_and_global_offset)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

def _ep_offsets(model: nn.Module) -> dict[str, int]:
    """Parameter name -> first global expert this EP rank holds (expert-parallel stacks only)."""
    from ..moe.layer import MoELayer
    from .expert_parallel import AllToAllDispatcher

    out = {}
    for prefix, m in model.named_modules():
        if isinstance(m, MoELayer) and isinstance(m.dispatcher, AllToAllDispatcher):
            lo = m.dispatcher.rank * m.dispatcher.local_experts
            for s in m.experts.stacked:
                out[f"{prefix}.experts.{s}"] = lo
    return out


def _to_empty(model: nn.Module, device) -> None:
    """model.to_empty, keeping the marks set on parameters (`_ep_expert`, ...): meta -> a real
    device makes new Parameter objects, and sync_gradients reads those marks."""
    marks = {n: dict(p.__dict__) for n, p in model.named_parameters()}
    model.to_empty(device=device)
    for n, p in model.named_parameters():
        for k, v in marks[n].items():
            if not hasattr(p, k):
                setattr(p, k, v)


def local_index(name: str, p: torch.Tensor, ep_lo: dict[str, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of this rank's part of parameter `name` within the full (unsharded) tensor."""
    shape, offset = tuple(p.shape), (0,) * p.dim()
    if hasattr(p, "placements"):  # DTensor: p.shape is its global shape (after the EP cut)
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        shape, offset = tuple(shape), tuple(offset)
    if name in ep_lo:
        offset = (offset[0] + ep_lo[name],) + offset[1:]
    return offset, shape


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod, _, attr = name.rpartition(".")
    return model.get_submodule(mod), attr


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, parameter name): independent of init order and of sharding."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def fresh_tensor(model: nn.Module, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The full fp32 initial value of parameter `name` (the rules of _init_weights)."""
    from ..modeling_openmoe import OpenMoeRMSNorm
    from ..moe.layer import MoELayer

    std = model.config.initializer_range
    owner, attr = _owner(model, name)
    parent = model.get_submodule(name.rpartition(".")[0].rpartition(".")[0]) if name.count(".") >= 2 else None
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    out = torch.empty(shape, dtype=torch.float32)
    if isinstance(owner, OpenMoeRMSNorm) and attr == "weight":
        return out.fill_(1.0)
    if isinstance(owner, nn.Linear) and attr == "weight":
        std = std * getattr(owner, "init_scale", 1.0)
    elif isinstance(owner, nn.Embedding) and attr == "weight":
        pass
    elif isinstance(owner, MoELayer) and attr == "gate_weight":
        pass
    elif isinstance(parent, MoELayer) and attr in getattr(owner, "stacked", ()):
        pass
    else:
        raise ValueError(f"fresh init: no rule for parameter {name} ({type(owner).__name__}.{attr})")
    return out.normal_(0.0, std, generator=g)


@torch.no_grad()
def _fill(p: torch.Tensor, part: torch.Tensor) -> None:
    local = p.to_local() if hasattr(p, "to_local") else p
    local.copy_(part.to(local.dtype))


def _part(full, offset, shape):
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]


@torch.no_grad()
def _buffers(model: nn.Module) -> None:
    """Buffers (rope inv_freq, not saved) are recomputed by the model's own init; only modules
    that own buffers and no parameters, so that no parameter is drawn again."""
    for m in model.modules():
        if any(True for _ in m.buffers(recurse=False)) and not any(True for _ in m.parameters(recurse=False)):
            model._init_weights(m)


def materialize_fresh(model: nn.Module, device: torch.device | str, seed: int) -> nn.Module:
    """to_empty on `device`, then every parameter's local part from its per-tensor init."""
    ep_lo = _ep_offsets(model)
    _to_empty(model, device)
    for name, p in model.named_parameters():
        offset, shape = local_index(name, p, ep_lo)
        full_shape = _full_shape(model, name, p)
        full = fresh_tensor(model, name, full_shape, seed)  # one full tensor at a time
        _fill(p, _part(full, offset, shape))
        del full
    _buffers(model)
    return model


def _full_shape(model: nn.Module, name: str, p: torch.Tensor) -> tuple[int, ...]:
    shape = tuple(p.shape)  # global for DTensors; EP stacks: the number of experts is the layer's
    owner, _ = _owner(model, name)
    parent = model.get_submodule(name.rpartition(".")[0].rpartition(".")[0])
    if hasattr(parent, "num_experts") and name.rpartition(".")[2] in getattr(owner, "stacked", ()):
        shape = (parent.num_experts,) + shape[1:]
    return shape


def init_per_tensor_(model: nn.Module, seed: int) -> nn.Module:
    """One process, a materialised model: the same per-tensor init in place (the plain reference)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(fresh_tensor(model, name, tuple(p.shape), seed))
    return model


def _weight_files(folder: Path) -> dict[str, Path]:
    """Checkpoint key -> safetensors file (one file, or the shards an index json names)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: folder / f for k, f in wm.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{folder}: no model.safetensors nor model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


def _checkpoint_key(name: str, keys: dict, prefix: str) -> str:
    """Our parameter name as the checkpoint spells it (with or without the base-model prefix, as
    from_pretrained accepts both)."""
    if name in keys:
        return name
    bare = name[len(prefix) + 1:] if name.startswith(prefix + ".") else None
    if bare is not None and bare in keys:
        return bare
    raise ValueError(f"init_from: the checkpoint has no weight for {name}")


def materialize_from(model: nn.Module, folder: str | Path, device: torch.device | str) -> nn.Module:
    """to_empty on `device`, then read every parameter's local part from the safetensors files in
    `folder`, file by file, slice by slice.

    The file is opened once per tensor: safetensors reads a slice through an mmap, and the pages
    it touched count in this process's RSS until the file is closed. Kept open for a whole file,
    they add up to a second copy of this rank's shards at the peak (measured: 190 MB per rank
    for 87 MB of shards, width 384 at 4 ranks); closed per tensor, one slice's pages at most.
    An open costs ~0.1 ms (header parse)."""
    from safetensors import safe_open

    folder = Path(folder)
    files = _weight_files(folder)
    ep_lo = _ep_offsets(model)
    _to_empty(model, device)
    params = dict(model.named_parameters())
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name in params:
        key = _checkpoint_key(name, files, model.base_model_prefix)
        by_file.setdefault(files[key], []).append((name, key))
    for path, items in sorted(by_file.items()):
        for name, key in items:
            with safe_open(str(path), "pt") as f:
                p = params[name]
                offset, shape = local_index(name, p, ep_lo)
                sl = f.get_slice(key)
                want = _full_shape(model, name, p)
                if tuple(sl.get_shape()) != want:
                    raise ValueError(f"{path.name}: {key} has shape {tuple(sl.get_shape())}, the model "
                                     f"expects {want}")
                _fill(p, sl[tuple(slice(o, o + s) for o, s in zip(offset, shape))])
    _buffers(model)
    return model
