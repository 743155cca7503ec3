"""T5X checkpoint folder -> HF model folder, streamed one parameter at a time.

    convert("checkpoint_500000", "openmoe-base-hf", config="base", tokenizer="umt5.spm")

Order of work, so that bad input fails before anything is written: index the checkpoint (msgpack
structure and every `.zarray`), settle the config (inferred from shapes, or given and checked),
load the tokenizer; only then stream: inflate each stored chunk, transpose and cast it, and write
it into its place in the shard file (the next chunks are inflated meanwhile); no parameter is
assembled in memory. Everything lands in a temporary folder that is renamed into place at the end.
"""

from __future__ import annotations

import collections
import copy
import math
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
from .shards import (ShardWriter, TensorSlot, TensorSpec, check_output_free, output_folder, parse_size,
                     plan_shards)
from .t5x import Chunk, T5XCheckpoint, storage_numpy

OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
UMT5_EXTRA_IDS = 300  # umT5's sentinel tokens, appended after its 256000 pieces
_BLOCK_BYTES = 64 << 20  # conversion granularity: bounds the extra memory of a transpose or cast
_PREFETCH_BYTES = 512 << 20  # inflated chunks held ahead of the writer (at least one)


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
        digests: dict[str, str] = {}  # each shard's sha256, hashed while written: for the manifest
        with output_folder(output, fsync=fsync, digests=digests) as tmp:
            _stream(ckpt, items, ShardWriter(tmp, shards, fsync=fsync, digests=digests), workers, progress)
            write_metadata(tmp, cfg, out_dtype)
            if tok is not None:
                tok.model_max_length = cfg.max_position_embeddings
                tok.save_pretrained(tmp)
    return Path(output)


def _stream(ckpt: T5XCheckpoint, items: list[Item], writer: ShardWriter, workers: int,
            progress: bool | None) -> None:
    """Every stored chunk, in the plan's order, is read and inflated in `workers` threads (file
    reads and zlib release the GIL) a few chunks ahead, while this thread converts the current
    one and writes it into its place in the shard file (TensorSlot): what is held is a few
    chunks, and, for a tensor whose chunks are not whole output rows, that tensor's pages."""
    from tqdm.auto import tqdm

    total = sum(it.spec.nbytes for it in items)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr,
               disable=(not progress) if progress is not None else None)
    per_item = [ckpt.chunks(it.t5x) for it in items]
    loaded = _prefetched([c for chunks in per_item for c in chunks], workers)
    try:
        for k, (it, chunks) in enumerate(zip(items, per_item)):
            src_dtype = ckpt.params[it.t5x].dtype
            with writer.tensor(it.hf) as slot:
                for chunk in chunks:
                    write_chunk(slot, chunk.region, next(loaded), it.op, src_dtype)
            bar.set_postfix_str(f"{k + 1}/{len(items)} params", refresh=False)
            bar.update(it.spec.nbytes)
        writer.finish()
    finally:
        loaded.close()  # cancels the reads ahead, waits for the running ones
        writer.abort()
        bar.close()


def _prefetched(chunks: list[Chunk], workers: int) -> Iterator[np.ndarray]:
    """The chunks' arrays in order, loaded in `workers` threads up to `workers` chunks
    (and _PREFETCH_BYTES) ahead; a chunk counts until the consumer asks for the next one."""
    with ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        held, i = 0, 0
        try:
            while pending or i < len(chunks):
                while i < len(chunks) and len(pending) < workers and \
                        (not pending or held + chunks[i].nbytes <= _PREFETCH_BYTES):
                    pending.append((pool.submit(chunks[i].load), chunks[i].nbytes))
                    held += chunks[i].nbytes
                    i += 1
                future, nbytes = pending.popleft()
                yield future.result()
                held -= nbytes
        finally:
            for future, _ in pending:
                future.cancel()


def write_chunk(slot: TensorSlot, region: tuple[slice, ...], data: np.ndarray, op: str,
                src_dtype: torch.dtype) -> None:
    """One stored chunk (`region` of the T5X array, storage dtype) into the output tensor:
    transposed and cast in row blocks of about _BLOCK_BYTES, so a conversion never makes a
    second copy of the chunk; a chunk that needs neither is written straight from `data`."""
    if op == TRANSPOSE:
        data, region = data.T, region[::-1]
    if data.ndim == 0:
        data, region = data.reshape(1), (slice(0, 1),)
    out_dtype = slot.spec.dtype
    cast = src_dtype != out_dtype or not data.dtype.isnative
    row_bytes = max(1, math.prod(data.shape[1:]) * max(data.itemsize, out_dtype.itemsize))
    step = max(1, _BLOCK_BYTES // row_bytes)
    for r in range(0, data.shape[0], step):
        part = data[r:r + step]
        rows = slice(region[0].start + r, region[0].start + r + part.shape[0])
        slot.write((rows, *region[1:]), _cast(part, src_dtype, out_dtype) if cast else part)


def _cast(part: np.ndarray, src_dtype: torch.dtype, out_dtype: torch.dtype) -> np.ndarray:
    """torch's cast (round to nearest even into bfloat16), on a writable native-order copy
    (inflated chunks are read-only bytes, which torch does not take)."""
    t = torch.from_numpy(np.array(part, dtype=part.dtype.newbyteorder("="), order="C"))
    t = t.view(src_dtype) if src_dtype == torch.bfloat16 else t
    return storage_numpy(t.to(out_dtype))
