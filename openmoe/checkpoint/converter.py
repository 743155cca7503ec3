"""T5X checkpoint folder -> HF model folder, streamed one parameter at a time.

    convert("checkpoint_500000", "openmoe-base-hf", config="base", tokenizer="umt5.spm")

Order of work, so that bad input fails before anything is written: index the checkpoint (msgpack
structure and every `.zarray`), settle the config (inferred from shapes, or given and checked),
load the tokenizer; only then stream: read a parameter, map and transpose it, append it to the
current shard (the next parameter is read meanwhile). Everything lands in a temporary folder
that is renamed into place at the end.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..configuration_openmoe import OpenMoeConfig
from .errors import CheckpointError
from .infer_config import config_problems, expected_shapes, format_problems, infer_config, load_config
from .keymap import TRANSPOSE, hf_shape, to_hf
from .shards import ShardWriter, TensorSpec, check_output_free, output_folder, parse_size, plan_shards
from .t5x import T5XCheckpoint

OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
UMT5_EXTRA_IDS = 300  # umT5's sentinel tokens, appended after its 256000 pieces
_BLOCK_BYTES = 64 << 20  # conversion granularity: bounds the extra memory of a transpose


@dataclass(frozen=True)
class Item:
    hf: str
    t5x: str
    op: str
    spec: TensorSpec  # the output tensor


def resolve_config(ckpt: T5XCheckpoint, config: str | OpenMoeConfig | None, head_dim: int | None
                   ) -> tuple[OpenMoeConfig, str]:
    """The config to write: inferred when not given; either way checked against every shape."""
    shapes = ckpt.shapes()
    files = {n: p.source for n, p in ckpt.params.items()}
    if config is None:
        cfg, how = infer_config(shapes, str(ckpt.file), head_dim)
    else:
        cfg = config if isinstance(config, OpenMoeConfig) else load_config(config)
        how = f"--config {config}" if isinstance(config, str) else "given config"
    problems = config_problems(cfg, shapes, files, str(ckpt.file))
    if problems:
        prefix = "" if config is None else f"{how} does not match the checkpoint: "
        raise CheckpointError(prefix + format_problems(problems))
    return cfg, how


def plan(ckpt: T5XCheckpoint, cfg: OpenMoeConfig, dtype: torch.dtype) -> list[Item]:
    """One Item per model parameter, in the model's order."""
    items = []
    for t5x_name in expected_shapes(cfg):
        param = ckpt.params[t5x_name]
        if not param.dtype.is_floating_point:
            raise CheckpointError(f"{t5x_name}: dtype {param.dtype} in {param.source} is not a float")
        hf_name, op = to_hf(t5x_name)
        items.append(Item(hf_name, t5x_name, op, TensorSpec(hf_name, hf_shape(param.shape, op), dtype)))
    return items


def blocks(t: torch.Tensor, op: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The converted tensor as contiguous row blocks of about _BLOCK_BYTES: the transpose and
    the cast happen block by block, so no second full-size copy is ever made."""
    src = t.t() if op == TRANSPOSE else t
    if src.dim() < 2:
        yield src.to(dtype).contiguous()
        return
    row_bytes = max(1, src[0].numel() * max(src.element_size(), dtype.itemsize))
    step = max(1, _BLOCK_BYTES // row_bytes)
    for r in range(0, src.shape[0], step):
        yield src[r:r + step].to(dtype).contiguous()  # (.to alone keeps a transposed view)


def load_tokenizer(spm_file: str, vocab_size: int, extra_ids: int = UMT5_EXTRA_IDS,
                   max_positions: int | None = None):
    """The umT5 sentencepiece model as an exact fast tokenizer (data/spm.py) with OpenMoE's chat
    template: ids equal sentencepiece's own, BOS 0 added, no eos appended."""
    from ..data.spm import fast_tokenizer
    from ..generation.chat import CHAT_TEMPLATE

    src = Path(spm_file)
    if not src.is_file():
        raise CheckpointError(f"--tokenizer {spm_file}: no such file")
    try:
        tok = fast_tokenizer(src, extra_ids=extra_ids, chat_template=CHAT_TEMPLATE, model_max_length=max_positions)
    except Exception as e:  # noqa: BLE001  (any failure to parse is bad input)
        raise CheckpointError(f"--tokenizer {spm_file}: not a usable sentencepiece model "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if (tok.pad_token_id, tok.eos_token_id) != (0, 1):
        raise CheckpointError(f"--tokenizer {spm_file}: pad/eos ids are {tok.pad_token_id}/{tok.eos_token_id}, "
                              f"OpenMoE's umT5 tokenizer has 0/1")
    if len(tok) > vocab_size:
        raise CheckpointError(f"--tokenizer {spm_file}: {len(tok)} tokens do not fit the model's "
                              f"vocab_size {vocab_size}")
    return tok


def write_metadata(folder: Path, cfg: OpenMoeConfig, dtype: torch.dtype) -> None:
    """config.json (with auto_map and the modeling code beside it, as save_pretrained does)
    and generation_config.json: bos, eos, pad. (No stop_strings there: generate() would demand a
    tokenizer; OpenMoeForCausalLM.generate adds the `</s>` stop string when it has one.)"""
    from transformers import GenerationConfig

    from ..remote_code import AUTO_MAP, write_remote_code

    cfg = copy.deepcopy(cfg)  # the caller's config object stays as it was
    cfg.architectures = ["OpenMoeForCausalLM"]
    cfg.auto_map = dict(AUTO_MAP)
    cfg.dtype = dtype
    cfg.save_pretrained(folder)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                     pad_token_id=cfg.pad_token_id).save_pretrained(folder)
    write_remote_code(folder)


def convert(checkpoint: str | os.PathLike, output: str | os.PathLike, *,
            config: str | OpenMoeConfig | None = None, dtype: str = "float32",
            max_shard_size: str | int = "5GB", tokenizer: str | None = None,
            tokenizer_extra_ids: int = UMT5_EXTRA_IDS, head_dim: int | None = None,
            workers: int = 2, progress: bool | None = None, fsync: bool = True,
            log=print) -> Path:
    """Convert; returns the output folder. Raises CheckpointError on bad input, leaving nothing."""
    if dtype not in OUT_DTYPES:
        raise CheckpointError(f"--dtype {dtype}: choose one of {sorted(OUT_DTYPES)}")
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise CheckpointError(f"--max-shard-size: {e}") from None
    out_dtype = OUT_DTYPES[dtype]
    check_output_free(Path(output).absolute())
    with T5XCheckpoint(checkpoint) as ckpt:
        cfg, how = resolve_config(ckpt, config, head_dim)
        items = plan(ckpt, cfg, out_dtype)
        tok = load_tokenizer(tokenizer, cfg.vocab_size, tokenizer_extra_ids, cfg.max_position_embeddings) if tokenizer else None
        shards = plan_shards([it.spec for it in items], shard_bytes)
        log(f"{ckpt.file}: {len(items)} parameters, config {how}; writing {len(shards)} shard(s) of "
            f"{dtype} to {output}")
        with output_folder(output, fsync=fsync) as tmp:
            _stream(ckpt, items, ShardWriter(tmp, shards, fsync=fsync), workers, progress)
            write_metadata(tmp, cfg, out_dtype)
            if tok is not None:
                tok.model_max_length = cfg.max_position_embeddings
                tok.save_pretrained(tmp)
    return Path(output)


def _stream(ckpt: T5XCheckpoint, items: list[Item], writer: ShardWriter, workers: int,
            progress: bool | None) -> None:
    """Read parameter k+1 (in a thread: file reads, zlib and numpy copies release the GIL)
    while parameter k is transposed and written: two source-sized buffers in memory."""
    from tqdm.auto import tqdm

    total = sum(it.spec.nbytes for it in items)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr,
               disable=(not progress) if progress is not None else None)
    # Two buffers in turn: parameter k+1 is read into one while k is written from the other.
    size = max((ckpt.params[it.t5x].nbytes for it in items), default=0)
    buffers = [np.empty(size, np.uint8), np.empty(size, np.uint8)]
    with ThreadPoolExecutor(1) as reader:
        def read(k: int):
            return reader.submit(ckpt.read, items[k].t5x, workers, buffers[k % 2]) if k < len(items) else None

        pending = read(0)
        try:
            for k, it in enumerate(items):
                t = pending.result()
                pending = read(k + 1)  # into the other buffer: `t` stays valid while written
                writer.write(it.hf, blocks(t, it.op, it.spec.dtype))
                del t
                bar.set_postfix_str(f"{k + 1}/{len(items)} params", refresh=False)
                bar.update(it.spec.nbytes)
            writer.finish()
        finally:
            if pending is not None:
                pending.cancel()
            writer.abort()
            bar.close()
