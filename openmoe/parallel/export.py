"""One consolidated HF folder from a distributed model, streamed: each tensor is gathered
(FSDP shards over all ranks, experts over their EP group) and appended to the current
safetensors shard on rank 0, then dropped; no rank ever holds the whole model at once.
Experts are written in logical order (expert e at row e), whatever the balancer's placement."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from .grads import is_expert
from .layers import expert_parallel_layers
from .mesh import ParallelState


def export_distributed(model, tokenizer, out: str | os.PathLike, ps: ParallelState,
                           max_shard: str = "2GB") -> None:
    from ..checkpoint.shards import TensorSpec, ShardWriter, output_folder, parse_size, plan_shards
    from ..remote_code import AUTO_MAP, write_remote_code

    sd = model.state_dict()
    # expert tensors by their marker (grads.is_expert), each with its layer's placement
    # (logical expert -> physical slot); nothing assumes the model's parameter names
    placement = {}
    for layer_name, layer in expert_parallel_layers(model):
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        for n, p in layer.experts.named_parameters():
            if is_expert(p):
                placement[prefix + n] = layer.dispatcher.placement
    full_shapes = {}
    for name, t in sd.items():
        shape = tuple(t.shape)  # a DTensor reports its global shape
        if name in placement:
            shape = (shape[0] * ps.ep, *shape[1:])
        full_shapes[name] = shape
    names = sorted(sd)
    writer = ctx = folder = None
    if ps.is_main:
        out = Path(out)
        if out.exists():
            import shutil

            shutil.rmtree(out)  # the trainer's own export folder from an earlier run
        specs = [TensorSpec(n, full_shapes[n], sd[n].dtype) for n in names]  # dtype: a DTensor's too
        ctx = output_folder(out)
        folder = ctx.__enter__()
        writer = ShardWriter(folder, plan_shards(specs, parse_size(max_shard)))
    try:
        for name in names:
            t = sd[name].detach()
            t = (t.full_tensor() if hasattr(t, "full_tensor") else t).contiguous().cpu()
            if name in placement:
                parts = [torch.empty_like(t) for _ in range(ps.ep)]
                dist.all_gather(parts, t, group=ps.ep_group)
                t = torch.cat(parts)[placement[name]]  # physical slot order -> logical expert order
            if writer is not None:
                writer.write(name, [t])
            del t
        if writer is not None:
            writer.finish()
            model.config.auto_map = dict(AUTO_MAP)
            model.config.save_pretrained(folder)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(folder)
            write_remote_code(folder)
            tokenizer.save_pretrained(folder)
            ctx.__exit__(None, None, None)
    except BaseException as e:
        if ctx is not None:
            ctx.__exit__(type(e), e, e.__traceback__)
        raise
    dist.barrier()
