"""Read the parameters of a T5X checkpoint folder, one at a time.

    for name, tensor in iter_params("checkpoint_500000"):   # T5X names, torch tensors
        ...

A folder `checkpoint_<step>/` holds `checkpoint` (flax msgpack: `{'version': 3, 'optimizer':
{'target': {...parameters...}, 'state': {...Adafactor...}}}`) and one Zarr v2 folder per
partitioned array, named in the msgpack by a tensorstore spec. Parameters under `target` are
read; the optimizer state is never read (docs/openmoe-numerics.md, section 5).

Opening a checkpoint reads only the msgpack structure and every array's `.zarray`, so names,
shapes and dtypes are known, and checked, before any data is touched.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError
from .msgpack_tree import Leaf, MsgpackTree, is_spec_keys
from .zarr import ZarrArray

SUPPORTED_VERSIONS = (2, 3)
_KVSTORE_DRIVERS = ("file", "gfile", "gcs")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float64": torch.float64, "int32": torch.int32, "int64": torch.int64}


@dataclass(frozen=True)
class Chunk:
    """A stored piece of a parameter: `load()` gives it as a numpy array of `region`'s shape in
    the storage dtype (uint16 for bfloat16); `nbytes` bounds the memory a load takes."""

    region: tuple[slice, ...]
    nbytes: int
    load: Callable[[], np.ndarray]


@dataclass(frozen=True)
class Param:
    """One parameter: where it lives and what it holds, known without reading its data."""

    name: str  # path under optimizer/target, e.g. "decoder/layers_0/mlp/wo/kernel"
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: Path  # the zarr folder, or the msgpack file for an inline array
    leaf: Leaf
    array: ZarrArray | None  # None: stored inline in the msgpack

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class T5XCheckpoint:
    """The parameter index of one T5X checkpoint. Use as a context manager, or close()."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.file = path / "checkpoint" if path.is_dir() else path
        self.folder = self.file.parent
        if not self.file.is_file():
            raise CheckpointError(f"{self.file}: no T5X msgpack 'checkpoint' file there")
        self._tree = MsgpackTree(self.file)
        try:
            self.version, target = self._target_path()
            self.params = {p.name: p for p in (self._param(leaf) for leaf in self._tree.leaves(*target))}
        except BaseException:
            self._tree.close()
            raise

    def __enter__(self) -> "T5XCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._tree.close()

    def __len__(self) -> int:
        return len(self.params)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: p.shape for n, p in self.params.items()}

    def _target_path(self) -> tuple[int, tuple[str, ...]]:
        pos = self._tree.find("version")
        version = self._tree.decode_at(pos) if pos is not None else 0
        if version == 0 and self._tree.find("target") is not None:
            return 0, ("target",)  # a plain flax checkpoint: the root is the optimizer
        if not isinstance(version, int) or version not in SUPPORTED_VERSIONS:
            raise CheckpointError(f"{self.file}: checkpoint version {version!r} is not supported "
                                  f"(expected one of {SUPPORTED_VERSIONS})")
        return version, ("optimizer", "target")

    def _param(self, leaf: Leaf) -> Param:
        peek = self._tree.peek_array(leaf)
        if peek is not None:  # inline in the msgpack
            shape, dtype_name = peek
            if dtype_name not in _TORCH_DTYPES:
                raise CheckpointError(f"{leaf.name}: unsupported inline dtype {dtype_name!r} in {self.file}")
            return Param(leaf.name, shape, _TORCH_DTYPES[dtype_name], self.file, leaf, None)
        spec = self._tree.decode(leaf)
        if not isinstance(spec, dict) or not is_spec_keys(spec):
            raise CheckpointError(f"{leaf.name}: not an array (a {type(spec).__name__}) in {self.file}")
        folder = self._resolve(spec, leaf.name)
        array = ZarrArray.open(folder, leaf.name)
        meta_shape = (spec.get("metadata") or {}).get("shape")
        if meta_shape is not None and tuple(meta_shape) != array.shape:
            raise CheckpointError(f"{leaf.name}: shape {list(array.shape)} in {folder / '.zarray'} does not "
                                  f"match {list(meta_shape)} recorded in {self.file}")
        return Param(leaf.name, array.shape, array.torch_dtype, folder, leaf, array)

    def _resolve(self, spec: dict, name: str) -> Path:
        """The array folder of a tensorstore spec. T5X writes paths relative to the checkpoint
        folder, in `kvstore.path` (file driver) or a top-level `path` (older tensorstore, and
        t5x's gcs specs, whose bucket is a placeholder); a gcs path resolves locally too."""
        kv = spec.get("kvstore")
        driver, kv_path = None, None
        if isinstance(kv, dict):
            driver, kv_path = kv.get("driver"), kv.get("path")
        elif isinstance(kv, str):  # a kvstore URL: file:///abs/path or gs://bucket/rel/path
            scheme, _, rest = kv.partition("://")
            driver = {"gs": "gcs"}.get(scheme, scheme)
            kv_path = rest if driver == "file" else rest.partition("/")[2]
        if driver is not None and driver not in _KVSTORE_DRIVERS:
            raise CheckpointError(f"{name}: kvstore driver {driver!r} in {self.file} is not supported "
                                  f"(file or gcs)")
        parts = [p for p in (kv_path, spec.get("path")) if p]
        if not parts:
            raise CheckpointError(f"{name}: its tensorstore spec in {self.file} names no path")
        rel = "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))
        if driver == "gcs":
            rel = rel.lstrip("/")  # a bucket-relative path: relative to the checkpoint folder
        return self.folder / rel  # an absolute path stays absolute

    def read(self, name: str, workers: int = 1) -> torch.Tensor:
        """One parameter as a torch tensor (float32, bfloat16, ... as stored)."""
        p = self._get(name)
        if p.array is not None:
            return p.array.read(workers)
        return self._inline(p)

    def chunks(self, name: str) -> list[Chunk]:
        """One parameter as the pieces it is stored in, to be read one at a time (in any
        thread): a zarr array's chunks, or the whole array for one stored inline."""
        p = self._get(name)
        if p.array is None:
            return [Chunk(tuple(slice(0, s) for s in p.shape), p.nbytes, lambda: storage_numpy(self._inline(p)))]
        a = p.array
        return [Chunk(a.chunk_region(i), a.chunk_nbytes, functools.partial(a.read_chunk, i))
                for i in a.chunk_indices()]

    def _get(self, name: str) -> Param:
        p = self.params.get(name)
        if p is None:
            raise CheckpointError(f"{name}: no such parameter in {self.file}")
        return p

    def _inline(self, p: Param) -> torch.Tensor:
        value = self._tree.decode(p.leaf)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != p.shape:
            raise CheckpointError(f"{p.name}: inline array in {self.file} is malformed")
        return value

    def iter_params(self, names: Iterable[str] | None = None, workers: int = 1
                    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name in (self.params if names is None else names):
            yield name, self.read(name, workers)


def storage_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor's bit pattern as numpy (bfloat16 as uint16, which numpy lacks)."""
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def iter_params(path: str | os.PathLike, names: Iterable[str] | None = None, workers: int = 1
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (T5X parameter name, tensor) lazily, one array in memory at a time; all of them
    in file order, or `names` in that order. The optimizer state is not read."""
    with T5XCheckpoint(path) as ckpt:
        yield from ckpt.iter_params(names, workers)
