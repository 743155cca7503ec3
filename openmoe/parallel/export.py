"""One consolidated HF folder from a distributed model, streamed: each tensor is gathered
(FSDP shards over all ranks, experts over their EP group) and appended to the current
safetensors shard on rank 0, then dropped; no rank ever holds the whole model at once."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from .mesh import ParallelState


def export_distributed(model, tokenizer, out: str | os.PathLike, ps: ParallelState,
                           max_shard: str = "2GB") -> None:
    from ..checkpoint.shards import TensorSpec, ShardWriter, output_folder, parse_size, plan_shards
    from ..remote_code import AUTO_MAP, write_remote_code

    sd = model.state_dict()
    placement = {}  # "model.layers.3.mlp." -> logical expert -> physical slot
    for name, mod in model.named_modules():
        disp = getattr(mod, "dispatcher", None)
        if disp is not None and hasattr(disp, "placement"):
            placement[name + "."] = disp.placement
    full_shapes = {}
    for name, t in sd.items():
        shape = tuple(t.shape)  # a DTensor reports its global shape
        if ".mlp.experts." in name and ps.ep > 1:
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
            if ".mlp.experts." in name and ps.ep > 1:
                parts = [torch.empty_like(t) for _ in range(ps.ep)]
                dist.all_gather(parts, t, group=ps.ep_group)
                t = torch.cat(parts)  # physical slot order
                prefix = name[: name.index("experts.")]
                if prefix in placement:
                    t = t[placement[prefix]]  # back to logical expert order
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
