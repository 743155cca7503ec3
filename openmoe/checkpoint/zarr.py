"""A minimal Zarr v2 array reader: what tensorstore writes for a T5X checkpoint, nothing more.

An array folder holds `.zarray` (JSON: shape, chunks, dtype, compressor, fill_value, order) and
one file per chunk named by its grid index joined with "." (or "/"). Chunks are gzip (or zlib, or
raw) C-order bytes of a full chunk, also at the array's edges, where the part past the end is
padding. A chunk file that is absent was never written and reads as the fill value (null: 0).

Reading it by hand with zlib keeps the dependencies to msgpack alone. tensorstore spells
bfloat16 "bfloat16" in `.zarray`; numpy has no such dtype, so it is read as uint16 and viewed as
torch.bfloat16.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError

# 32 + 15: zlib accepts a gzip or a zlib header, whichever the stream has.
_AUTO_HEADER_WBITS = 47
_COMPRESSORS = (None, "gzip", "zlib")


@dataclass(frozen=True)
class ZarrArray:
    name: str  # the parameter, for error messages
    folder: Path
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype  # storage dtype (uint16 for bfloat16)
    bfloat16: bool
    compressor: str | None
    fill_value: float
    order: str
    separator: str

    @classmethod
    def open(cls, folder: str | Path, name: str = "") -> "ZarrArray":
        """Parse `.zarray`; raises CheckpointError naming the parameter and the folder."""
        folder = Path(folder)
        meta_file = folder / ".zarray"
        if not folder.is_dir():
            raise CheckpointError(f"{name}: array folder {folder} is missing")
        try:
            meta = json.loads(meta_file.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{name}: {meta_file} is missing (not a zarr array folder)") from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{name}: cannot read {meta_file} ({e})") from None
        return cls._from_meta(meta, folder, name, meta_file)

    @classmethod
    def _from_meta(cls, meta: dict, folder: Path, name: str, meta_file: Path) -> "ZarrArray":
        def bad(msg: str) -> CheckpointError:
            return CheckpointError(f"{name}: {meta_file}: {msg}")

        if meta.get("zarr_format") != 2:
            raise bad(f"zarr_format {meta.get('zarr_format')!r}, only 2 is supported")
        try:
            shape = tuple(int(s) for s in meta["shape"])
            chunks = tuple(int(c) for c in meta["chunks"])
            dtype_name = meta["dtype"]
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"malformed metadata ({e!r})") from None
        if len(chunks) != len(shape) or any(c <= 0 for c in chunks):
            raise bad(f"chunks {list(chunks)} do not fit shape {list(shape)}")
        bf16 = dtype_name == "bfloat16"
        try:
            dtype = np.dtype("<u2") if bf16 else np.dtype(dtype_name)
        except TypeError:
            raise bad(f"unsupported dtype {dtype_name!r}") from None
        if dtype.kind not in "fiub" or dtype.hasobject:
            raise bad(f"unsupported dtype {dtype_name!r}")
        comp = meta.get("compressor")
        comp_id = comp.get("id") if isinstance(comp, dict) else comp
        if comp_id not in _COMPRESSORS:
            raise bad(f"compressor {comp_id!r} is not supported (gzip, zlib or none)")
        if meta.get("filters"):
            raise bad(f"filters {meta['filters']!r} are not supported")
        order = meta.get("order", "C")
        if order not in ("C", "F"):
            raise bad(f"order {order!r}")
        sep = meta.get("dimension_separator", ".")
        return cls(name, folder, shape, chunks, dtype, bf16, comp_id,
                   _fill_value(meta.get("fill_value"), dtype, bf16), order, sep)

    # -- geometry -------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.bfloat16:
            return torch.bfloat16
        return torch.from_numpy(np.empty(0, self.dtype.newbyteorder("="))).dtype  # numpy's -> torch's

    def chunk_indices(self):
        grid = [math.ceil(s / c) for s, c in zip(self.shape, self.chunks)]
        return itertools.product(*(range(g) for g in grid))

    def chunk_file(self, index: tuple[int, ...]) -> Path:
        # zarr v2 names the single chunk of a 0-d array "0"
        return self.folder / (self.separator.join(map(str, index)) if index else "0")

    def stored_nbytes(self) -> int:
        """Bytes of the chunk files on disk (what a read must load and inflate)."""
        return sum(e.stat().st_size for e in os.scandir(self.folder) if e.is_file() and e.name != ".zarray")

    # -- reading --------------------------------------------------------------------------------

    @property
    def chunk_nbytes(self) -> int:
        """Bytes of one inflated chunk (edge chunks are stored full size too)."""
        return math.prod(self.chunks) * self.dtype.itemsize

    def chunk_region(self, index: tuple[int, ...]) -> tuple[slice, ...]:
        """The part of the array that chunk `index` holds (edge chunks are cut at the array's end)."""
        return tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, self.chunks, self.shape))

    def read(self, workers: int = 1) -> torch.Tensor:
        """The whole array as a torch tensor. Chunks are inflated in `workers` threads (zlib
        and numpy copies release the GIL); each writes its own region of the output."""
        out = np.empty(self.shape, dtype=self.dtype)

        def into_out(index: tuple[int, ...]) -> None:
            out[self.chunk_region(index)] = self.read_chunk(index)

        indices = list(self.chunk_indices())
        if workers > 1 and len(indices) > 1:
            with ThreadPoolExecutor(min(workers, len(indices))) as pool:
                list(pool.map(into_out, indices))
        else:
            for i in indices:
                into_out(i)
        if not self.dtype.isnative:
            out = out.astype(self.dtype.newbyteorder("="))
        t = torch.from_numpy(out)
        return t.view(torch.bfloat16) if self.bfloat16 else t

    def read_chunk(self, index: tuple[int, ...]) -> np.ndarray:
        """Chunk `index` as a read-only array of its region's shape, in the storage dtype (a
        view of the inflated bytes: edge padding cut off, F order as a transposed view). A chunk
        file that was never written reads as the fill value (a broadcast scalar, no memory)."""
        region = self.chunk_region(index)
        file = self.chunk_file(index)
        try:
            with open(file, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return np.broadcast_to(np.asarray(self.fill_value, self.dtype), tuple(r.stop - r.start for r in region))
        except OSError as e:
            raise CheckpointError(f"{self.name}: cannot read chunk {file} ({e.strerror})") from None
        chunk = self.decode_chunk(raw, file)
        return chunk[tuple(slice(0, r.stop - r.start) for r in region)]

    def decode_chunk(self, raw: bytes, file: Path) -> np.ndarray:
        """Inflate one chunk file's bytes into a full chunk-shaped array (edge padding kept)."""
        want = self.chunk_nbytes
        if self.compressor is not None:
            try:
                raw = zlib.decompress(raw, _AUTO_HEADER_WBITS, want)
            except zlib.error as e:
                raise CheckpointError(f"{self.name}: chunk {file} is truncated or corrupt ({e})") from None
        if len(raw) != want:
            raise CheckpointError(f"{self.name}: chunk {file} holds {len(raw)} bytes, a {list(self.chunks)} "
                                  f"chunk of {self.dtype.str} needs {want} (truncated?)")
        arr = np.frombuffer(raw, dtype=self.dtype)
        if self.order == "F":
            return arr.reshape(self.chunks[::-1]).T
        return arr.reshape(self.chunks)


def _fill_value(value, dtype: np.dtype, bf16: bool):
    """The zarr fill_value as a storage-dtype scalar. null means 0, as tensorstore reads it."""
    if value is None:
        value = 0
    if isinstance(value, str):
        value = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(value, 0)
    if bf16:  # the bit pattern of the bfloat16 value
        return int(torch.tensor(float(value), dtype=torch.bfloat16).view(torch.int16).item()) & 0xFFFF
    return dtype.type(value)
