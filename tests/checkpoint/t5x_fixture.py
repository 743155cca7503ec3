"""Writes T5X checkpoints in the real on-disk format, for tests and the bench.

Written from the formats themselves (flax serialization, tensorstore's zarr driver), not with
our reader's code: the msgpack `checkpoint` with flax's ExtType 1 (ndarray: packed (shape,
dtype name, C-order bytes)), ExtType 3 (numpy scalar) and `__msgpack_chunked_array__` maps;
zarr v2 folders as tensorstore writes them (`.zarray` with "bfloat16" or "<f4", gzip level 1,
full-size edge chunks named i.j.k), and specs as `ts.Spec.to_json()` prints them (dtype at the
top level, kvstore path with a trailing "/").
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import zlib
from pathlib import Path

import msgpack
import numpy as np
import torch


def _np_bytes(t) -> tuple[tuple[int, ...], str, bytes]:
    if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16:
        return tuple(t.shape), "bfloat16", t.contiguous().view(torch.int16).numpy().tobytes()
    a = np.asarray(t.numpy() if isinstance(t, torch.Tensor) else t)  # (ascontiguousarray makes 0-d 1-d)
    return a.shape, a.dtype.name, a.tobytes("C")


def ndarray_ext(t) -> msgpack.ExtType:
    """flax.serialization's ExtType 1."""
    shape, name, data = _np_bytes(t)
    return msgpack.ExtType(1, msgpack.packb((list(shape), name, data), use_bin_type=True))


def scalar_ext(x: np.generic) -> msgpack.ExtType:
    """flax.serialization's ExtType 3 (a numpy scalar, packed as a 0-d array)."""
    a = np.asarray(x)
    return msgpack.ExtType(3, msgpack.packb(((), a.dtype.name, a.tobytes()), use_bin_type=True))


def chunked_inline(t, piece: int) -> dict:
    """flax's form for arrays too big for one msgpack object: flat pieces of `piece` elements."""
    flat = t.reshape(-1)
    pieces = [flat[i:i + piece] for i in range(0, flat.shape[0], piece)]
    return {"__msgpack_chunked_array__": True,
            "shape": {str(i): int(s) for i, s in enumerate(t.shape)},
            "chunks": {str(i): ndarray_ext(p) for i, p in enumerate(pieces)}}


def zarr_dtype(t) -> str:
    return "bfloat16" if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else "<f4"


def write_zarr(folder: Path, t, chunks, compressor: str | None = "gzip", skip=(),
               fill_value=None, order: str = "C", separator: str = ".") -> None:
    """One zarr v2 array folder. `skip`: chunk indices not written (they read as fill)."""
    folder.mkdir(parents=True)
    shape = tuple(t.shape)
    bf16 = zarr_dtype(t) == "bfloat16"
    arr = t.view(torch.int16).numpy() if bf16 else (t.numpy() if isinstance(t, torch.Tensor) else t)
    meta = {"chunks": list(chunks), "compressor": {"id": compressor, "level": 1} if compressor else None,
            "dimension_separator": separator, "dtype": zarr_dtype(t), "fill_value": fill_value,
            "filters": None, "order": order, "shape": list(shape), "zarr_format": 2}
    (folder / ".zarray").write_text(json.dumps(meta))
    grid = [math.ceil(s / c) for s, c in zip(shape, chunks)]
    for idx in itertools.product(*(range(g) for g in grid)):
        if idx in skip:
            continue
        block = np.zeros(chunks, dtype=arr.dtype)  # edge chunks are stored full size
        region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunks, shape))
        block[tuple(slice(0, r.stop - r.start) for r in region)] = arr[region]
        raw = block.tobytes("F" if order == "F" else "C")
        if compressor == "gzip":
            raw = gzip.compress(raw, compresslevel=1, mtime=0)
        elif compressor == "zlib":
            raw = zlib.compress(raw, 1)
        key = separator.join(map(str, idx)) if idx else "0"
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / key).write_bytes(raw)


def ts_spec(rel_path: str, t, chunks, driver: str = "file") -> dict:
    """The spec dict as t5x stores it (ts.Spec.to_json() of what it wrote)."""
    kv = {"driver": driver, "path": rel_path + "/"}
    if driver == "gcs":
        kv["bucket"] = "t5x-dummy-bucket"
    return {"driver": "zarr", "dtype": "bfloat16" if zarr_dtype(t) == "bfloat16" else "float32",
            "kvstore": kv, "metadata": {"chunks": list(chunks), "compressor": {"id": "gzip", "level": 1},
                                        "shape": list(t.shape)}}


def _nest(flat: dict) -> dict:
    root: dict = {}
    for name, value in flat.items():
        node = root
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return root


def default_chunks(name: str, shape) -> list[int]:
    """Pod-like layouts: one chunk per expert, the embedding in row blocks, others split in two
    along the first axis (so most arrays have edge chunks or several chunks)."""
    if "/expert/" in name:
        return [1, *shape[1:]]
    if len(shape) == 1:
        return [max(1, (shape[0] + 1) // 2)]
    return [max(1, (shape[0] + 2) // 3), *shape[1:]]


def write_checkpoint(folder: Path, params: dict, *, inline=(), chunked=(), kvstore: str = "file",
                     chunks=default_chunks, skip_chunks: dict | None = None, state: bool = True,
                     version: int = 3, extra_target: dict | None = None) -> Path:
    """A checkpoint_<step> folder: params (T5X name -> float32 or bf16 tensor) as zarr folders,
    except `inline` (ExtType 1) and `chunked` (chunked inline). With `state`, an Adafactor-like
    optimizer state that no reader may decode (its payloads are not valid data)."""
    folder.mkdir(parents=True)
    target = {}
    for name, t in params.items():
        if name in inline:
            target[name] = ndarray_ext(t)
        elif name in chunked:
            target[name] = chunked_inline(t, piece=max(1, t.numel() // 3))
        else:
            rel = "target." + name.replace("/", ".")
            c = chunks(name, tuple(t.shape))
            write_zarr(folder / rel, t, c, skip=(skip_chunks or {}).get(name, ()))
            target[name] = ts_spec(rel, t, c, kvstore)
    target.update(extra_target or {})
    root = {"version": version, "optimizer": {"target": _nest(target)}}
    if state:
        root["optimizer"]["state"] = {"step": scalar_ext(np.int32(500000)),
                                      "param_states": _poisoned_state(params)}
    (folder / "checkpoint").write_bytes(msgpack.packb(root, use_bin_type=True))
    return folder


def _poisoned_state(params: dict) -> dict:
    """Adafactor-shaped state whose leaves cannot be decoded (0xc1 is never valid msgpack) and
    whose zarr specs point at folders that do not exist: touching any of it fails."""
    bad = msgpack.ExtType(1, b"\xc1" * 64)
    states = {}
    for name in params:
        if "/expert/" in name:
            states[name] = {"v_row": {"driver": "zarr", "kvstore": {"driver": "file", "path": "state.missing/"}},
                            "v_col": bad}
        else:
            states[name] = {"v": bad, "v_row": ndarray_ext(np.zeros(1, np.float32))}
    return _nest(states)


def t5x_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """T5X name -> shape of an OpenMoE decoder, written from the T5X layout (docs/openmoe-numerics.md,
    section 5), not from our key map: kernels [in, out], experts [E, in, out], router [H, E]."""
    V, H, I, E = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    A, KV = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    s = {"token_embedder/embedding": (V, H)}
    for i in range(cfg.num_hidden_layers):
        p = f"decoder/layers_{i}/"
        s[p + "pre_self_attention_layer_norm/scale"] = (H,)
        s[p + "self_attention/query/kernel"] = (H, A)
        s[p + "self_attention/key/kernel"] = (H, KV)
        s[p + "self_attention/value/kernel"] = (H, KV)
        s[p + "self_attention/out/kernel"] = (A, H)
        s[p + "pre_mlp_layer_norm/scale"] = (H,)
        if (i + 1) % cfg.moe_layer_interval == 0:
            s[p + "mlp/router/router_weights/w/kernel"] = (H, E)
            s[p + "mlp/expert/wi_0/kernel"] = (E, H, 2 * I)
            s[p + "mlp/expert/wi_1/kernel"] = (E, H, I)
            s[p + "mlp/expert/wo/kernel"] = (E, I, H)
            s[p + "pre_extra_mlp_layer_norm/scale"] = (H,)
            mlp = "extra_mlp"
        else:
            mlp = "mlp"
        s[p + f"{mlp}/wi_0/kernel"] = (H, 2 * I)
        s[p + f"{mlp}/wi_1/kernel"] = (H, I)
        s[p + f"{mlp}/wo/kernel"] = (I, H)
    s["decoder/decoder_norm/scale"] = (H,)
    s["decoder/logits_dense/kernel"] = (H, V)
    return s


def random_params(cfg, seed: int = 0, bf16=()) -> dict[str, torch.Tensor]:
    """Random weights at a scale that keeps activations O(1); norm scales around 1. Names in
    `bf16` are bfloat16 (as stored), the rest float32."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in t5x_shapes(cfg).items():
        if name.endswith("/scale"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[-2] if len(shape) > 1 and "embedding" not in name else 1
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        out[name] = t.to(torch.bfloat16) if name in bf16 else t
    return out
