"""Streaming safetensors shards, written into a temporary folder that is renamed into place.

safetensors puts a JSON header (every tensor's dtype, shape and byte range) before the data.
All shapes are known before any data is read, so shards are planned up front: each shard's
header is written first and every tensor is then appended, in blocks, as it is converted. No
shard is ever held in memory: what is held is the source tensor and one converted block.

`output_folder` yields a temporary sibling of the output folder and renames it to the final
name only when everything in it is written and synced, so a failure or an interrupt leaves no
output behind, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..utils.sizes import parse_size
from .errors import CheckpointError

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.float64: "F64"}
INDEX_NAME = "model.safetensors.index.json"

__all__ = ["INDEX_NAME", "ShardWriter", "TensorSpec", "check_output_free", "output_folder", "parse_size",
           "plan_shards", "shard_name"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, in order: a new shard starts when the next tensor would overflow this one. A
    tensor larger than the limit gets a shard of its own (as HF does)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _header(tensors: list[TensorSpec]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes planned shards in order; `write(name, blocks)` appends one tensor, which must be
    the next one of the plan. `finish()` writes the index once every tensor is in."""

    def __init__(self, folder: str | os.PathLike, shards: list[list[TensorSpec]], fsync: bool = True):
        self.folder = Path(folder)
        self.shards = shards
        self.fsync = fsync
        self._queue = [(si, t) for si, shard in enumerate(shards) for t in shard]
        self._next = 0
        self._file = None
        self.weight_map: dict[str, str] = {}

    def write(self, name: str, blocks: Iterable[torch.Tensor]) -> None:
        if self._next >= len(self._queue) or self._queue[self._next][1].name != name:
            expected = self._queue[self._next][1].name if self._next < len(self._queue) else "nothing"
            raise RuntimeError(f"ShardWriter: got {name}, the plan expects {expected}")
        si, spec = self._queue[self._next]
        if self._file is None:
            self._open(si)
        written = 0
        for block in blocks:
            if block.dtype != spec.dtype:
                raise RuntimeError(f"ShardWriter: {name} block is {block.dtype}, planned {spec.dtype}")
            data = block.contiguous().reshape(-1).view(torch.uint8).numpy()
            self._file.write(memoryview(data))
            written += data.nbytes
        if written != spec.nbytes:
            raise RuntimeError(f"ShardWriter: {name} got {written} bytes, planned {spec.nbytes}")
        self.weight_map[name] = shard_name(si, len(self.shards))
        self._start_writeback()
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != si:
            self._close_file()

    def _open(self, si: int) -> None:
        self._file = open(self.folder / shard_name(si, len(self.shards)), "wb")
        self._file.write(_header(self.shards[si]))

    def _start_writeback(self) -> None:
        """Start writing this file's dirty pages to disk now (and drop the ones already
        written) instead of all at the shard's fsync: the final sync is short, and a 40 GB
        conversion does not push the source arrays out of the page cache."""
        self._file.flush()
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def _close_file(self) -> None:
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def finish(self) -> None:
        if self._next != len(self._queue):
            raise RuntimeError(f"ShardWriter: {len(self._queue) - self._next} planned tensors not written")
        total = sum(t.nbytes for shard in self.shards for t in shard)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def check_output_free(out: Path) -> None:
    """Refuse to replace anything: the output must not exist, or be an empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"output {out} already exists and is not an empty folder")
    if not out.parent.is_dir():
        raise CheckpointError(f"output {out}: its parent folder {out.parent} does not exist")


@contextlib.contextmanager
def output_folder(out: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `out` (same filesystem, so the rename is atomic);
    write its manifest.json and rename it to `out` on success, delete it on any error or
    interrupt (SIGTERM too, under utils.cli.install_signal_handlers). Stale temporary folders
    of dead processes are removed first (utils/atomic.py)."""
    from ..utils.atomic import atomic_folder

    out = Path(out).absolute()
    check_output_free(out)
    with atomic_folder(out, fsync=fsync, replace=False) as tmp:  # replaces an empty folder only
        yield tmp
        check_output_free(out)  # nothing appeared there meanwhile
