"""Streaming safetensors shards, written into a temporary folder that is renamed into place.

safetensors puts a JSON header (every tensor's dtype, shape and byte range) before the data.
All shapes are known before any data is read, so shards are planned up front: each shard file
is created at its full size with its header, and every tensor is then written into its byte
range, appended in blocks or region by region as its chunks arrive (TensorSlot). No shard or
tensor is ever held in memory: regions that are not whole rows go through a window of rows.

`output_folder` yields a temporary sibling of the output folder and renames it to the final
name only when everything in it is written and synced, so a failure or an interrupt leaves no
output behind, never a half-written one.

The manifest's sha256 of each shard is computed while the shards are written (ShardWriter with
`digests`): every byte range, once final, is read back from the page cache and hashed in one
background thread, so the manifest needs no second pass over the output at the end.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


class TensorSlot:
    """The bytes of one planned tensor in its shard file, written in place: `write(region,
    data)` puts an array (the output dtype's bit pattern, the region's shape) at the region's
    file offsets, in any order; `append(data)` writes on after what was written so far.

    A region that is one contiguous byte range (whole trailing rows) is written with pwrite
    straight from `data`. Any other region (a transposed or column-split chunk) is copied into a
    shared mmap of the tensor's bytes (made on the first such write, released on close()), a
    window of whole rows at a time whose pages are dropped from this process after the copy
    (_write_mapped): what is held does not grow with the tensor. The shard
    file is preallocated, so a full disk fails at its creation instead of as SIGBUS here."""

    def __init__(self, fd: int, offset: int, spec: TensorSpec):
        self.fd, self.offset, self.spec = fd, offset, spec
        self.shape = spec.shape or (1,)  # a 0-d tensor as one element
        self.written = 0
        self._map: mmap.mmap | None = None
        self._view: np.ndarray | None = None

    def append(self, data: np.ndarray) -> None:
        _pwrite_all(self.fd, data, self.offset + self.written)
        self.written += data.nbytes

    def write(self, region: tuple[slice, ...], data: np.ndarray) -> None:
        extents = tuple(r.stop - r.start for r in region)
        if len(region) != len(self.shape) or data.shape != extents or data.itemsize != self.spec.dtype.itemsize:
            raise RuntimeError(f"TensorSlot {self.spec.name}: region {extents} of {data.dtype} does not fit "
                               f"{self.shape} of {self.spec.dtype}")
        if _is_contiguous(extents, self.shape):
            start = sum(r.start * math.prod(self.shape[d + 1:]) for d, r in enumerate(region))
            _pwrite_all(self.fd, data, self.offset + start * data.itemsize)
        else:
            self._write_mapped(region, data)
        self.written += data.nbytes

    def _write_mapped(self, region: tuple[slice, ...], data: np.ndarray) -> None:
        """A region that is not one byte range, through the mmap, a window of whole output rows
        (about _WINDOW_BYTES) at a time: the window's pages are mapped in one call before the copy
        (faulting them one by one costs ~3x the copy) and unmapped after it. The written pages
        stay in the page cache, dirty, on their way to the file; this process keeps none of them,
        so its memory does not grow with the tensor's size."""
        view = self._mapped(data.dtype)
        row_bytes = math.prod(self.shape[1:]) * data.itemsize
        step = max(1, _WINDOW_BYTES // row_bytes)
        rows = region[0]
        for r in range(rows.start, rows.stop, step):
            hi = min(r + step, rows.stop)
            lo_b, hi_b = self._page_range(r * row_bytes, hi * row_bytes)
            _madvise(self._map, lo_b, hi_b - lo_b, _MADV_POPULATE_WRITE)
            view[(slice(r, hi), *region[1:])] = data[r - rows.start:hi - rows.start]
            _madvise(self._map, lo_b, hi_b - lo_b, mmap.MADV_DONTNEED)

    def _page_range(self, lo: int, hi: int) -> tuple[int, int]:
        """Byte range [lo, hi) of the tensor as page-aligned offsets into the mapping."""
        base, page = self._base, mmap.PAGESIZE
        return (base + lo) // page * page, min(len(self._map), -(-(base + hi) // page) * page)

    def _mapped(self, dtype: np.dtype) -> np.ndarray:
        if self._view is None:
            self._base = self.offset % mmap.ALLOCATIONGRANULARITY  # where the tensor starts in the mapping
            start = self.offset - self._base
            # mapped, not populated: _write_mapped maps in one window of pages at a time
            self._map = mmap.mmap(self.fd, self._base + self.spec.nbytes, flags=mmap.MAP_SHARED, offset=start)
            self._view = np.frombuffer(self._map, np.uint8, self.spec.nbytes, self._base)
        return self._view.view(dtype).reshape(self.shape)

    def close(self) -> None:
        self._view = None  # the only export of the mmap: it can close now
        if self._map is not None:
            self._map.close()
            self._map = None


_WINDOW_BYTES = 64 << 20  # whole output rows mapped at a time by TensorSlot's strided writes
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; Python's mmap module does not name it


def _madvise(m: mmap.mmap, start: int, length: int, advice: int) -> None:
    """m.madvise, where the kernel knows the advice; else nothing (pages are then faulted in
    one by one, or simply kept: slower or larger, never different bytes)."""
    try:
        m.madvise(advice, start, length)
    except (OSError, ValueError, AttributeError):
        pass


def _is_contiguous(extents: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether a region is one byte range in C order: single indices up to some axis, that
    axis any range, every later axis whole."""
    k = 0
    while k < len(shape) - 1 and extents[k] == 1:
        k += 1
    return extents[k + 1:] == shape[k + 1:]


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(data).reshape(-1)).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class _ShardHasher:
    """sha256 of files whose byte ranges become final front to back (a shard: its header, then
    each tensor in order). Each range is hashed in one background thread right after it is
    final, read back from the page cache where it was just written (regions arrive in any order
    inside a tensor, so bytes are hashed from the file, never from what was passed to write),
    while the writer goes on: hashlib and file reads release the GIL. Then the range's
    writeback is started (_start_writeback: after the hash, so that no page is dropped before
    it was read)."""

    _READ = 1 << 20

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-sha256")
        self._jobs: list[Future] = []
        self._state: dict[Path, tuple] = {}  # path -> (sha256, bytes hashed); the worker's only

    def add(self, path: Path, start: int, length: int) -> None:
        self._jobs.append(self._pool.submit(self._hash, path, start, length))

    def _hash(self, path: Path, start: int, length: int) -> None:
        h, done = self._state.get(path) or (hashlib.sha256(), 0)
        if start != done:
            raise RuntimeError(f"_ShardHasher: {path.name} range at {start}, expected {done} (out of order)")
        buf = memoryview(bytearray(min(self._READ, max(1, length))))
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            left = length
            while left:
                n = f.readinto(buf[:min(len(buf), left)])
                if not n:
                    raise RuntimeError(f"_ShardHasher: {path.name} ends before byte {start + length}")
                h.update(buf[:n])
                left -= n
            _start_writeback(f.fileno(), start, length)
        self._state[path] = (h, start + length)

    def result(self) -> dict[str, str]:
        """File name -> sha256, once every range is hashed; each file must be hashed whole."""
        for job in self._jobs:
            job.result()
        out = {}
        for path, (h, done) in self._state.items():
            if done != path.stat().st_size:
                raise RuntimeError(f"_ShardHasher: {path.name} hashed {done} of {path.stat().st_size} bytes")
            out[path.name] = h.hexdigest()
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class ShardWriter:
    """Writes planned shards in order, one file at a time. Each tensor must be the next one of
    the plan: `write(name, blocks)` appends its blocks, or `with tensor(name) as slot:` writes
    its regions in any order (TensorSlot). `finish()` writes the index once every tensor is in,
    and, given a `digests` dict, puts each shard's sha256 in it (shard file name -> hex digest),
    computed while writing (_ShardHasher) for the manifest (output_folder's `digests`)."""

    def __init__(self, folder: str | os.PathLike, shards: list[list[TensorSpec]], fsync: bool = True,
                 digests: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.shards = shards
        self.fsync = fsync
        self.digests = digests
        self._hasher = _ShardHasher() if digests is not None else None
        self._queue = [(si, t) for si, shard in enumerate(shards) for t in shard]
        self._next = 0
        self._fd: int | None = None
        self._offsets: dict[str, int] = {}  # tensor -> file offset of its data, in the open shard
        self.weight_map: dict[str, str] = {}

    def write(self, name: str, blocks: Iterable[torch.Tensor]) -> None:
        with self.tensor(name) as slot:
            for block in blocks:
                if block.dtype != slot.spec.dtype:
                    raise RuntimeError(f"ShardWriter: {name} block is {block.dtype}, planned {slot.spec.dtype}")
                slot.append(block.contiguous().reshape(-1).view(torch.uint8).numpy())

    @contextlib.contextmanager
    def tensor(self, name: str) -> Iterator[TensorSlot]:
        if self._next >= len(self._queue) or self._queue[self._next][1].name != name:
            expected = self._queue[self._next][1].name if self._next < len(self._queue) else "nothing"
            raise RuntimeError(f"ShardWriter: got {name}, the plan expects {expected}")
        si, spec = self._queue[self._next]
        if self._fd is None:
            self._open(si)
        slot = TensorSlot(self._fd, self._offsets[name], spec)
        try:
            yield slot
        finally:
            slot.close()
        if slot.written != spec.nbytes:
            raise RuntimeError(f"ShardWriter: {name} got {slot.written} bytes, planned {spec.nbytes}")
        self.weight_map[name] = shard_name(si, len(self.shards))
        if self._hasher is not None:  # hashed, then its writeback started, in the hasher's thread
            self._hasher.add(self._path(si), slot.offset, spec.nbytes)
        else:
            _start_writeback(self._fd, slot.offset, spec.nbytes)
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != si:
            self._close_file()

    def _open(self, si: int) -> None:
        header = _header(self.shards[si])
        self._offsets, offset = {}, len(header)
        for t in self.shards[si]:
            self._offsets[t.name] = offset
            offset += t.nbytes
        self._fd = os.open(self._path(si), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        _allocate(self._fd, offset)
        _pwrite_all(self._fd, np.frombuffer(header, np.uint8), 0)
        if self._hasher is not None:
            self._hasher.add(self._path(si), 0, len(header))

    def _path(self, si: int) -> Path:
        return self.folder / shard_name(si, len(self.shards))

    def _close_file(self) -> None:
        if self.fsync:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None

    def finish(self) -> None:
        if self._next != len(self._queue):
            raise RuntimeError(f"ShardWriter: {len(self._queue) - self._next} planned tensors not written")
        total = sum(t.nbytes for shard in self.shards for t in shard)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if self._hasher is not None:
            self.digests.update(self._hasher.result())

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._hasher is not None:
            self._hasher.close()


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing a finished tensor's dirty pages to disk now instead of all at the shard's
    fsync, so the final sync is short. Only its own range: dirty pages are not dropped, so the
    pages stay cached for a hash that reads them later, where DONTNEED on the whole file would
    drop every page already written back and make that hash read the output from disk again."""
    if hasattr(os, "posix_fadvise") and nbytes:
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


def _allocate(fd: int, size: int) -> None:
    """Reserve the file's blocks now: a full disk is an OSError here, not a SIGBUS on an mmap
    write later. Filesystems without fallocate get a sparse file of the same size."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)


def check_output_free(out: Path) -> None:
    """Refuse to replace anything: the output must not exist, or be an empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"output {out} already exists and is not an empty folder")
    if not out.parent.is_dir():
        raise CheckpointError(f"output {out}: its parent folder {out.parent} does not exist")


@contextlib.contextmanager
def output_folder(out: str | os.PathLike, fsync: bool = True, digests: dict[str, str] | None = None
                  ) -> Iterator[Path]:
    """Yield a temporary folder beside `out` (same filesystem, so the rename is atomic);
    write its manifest.json and rename it to `out` on success, delete it on any error or
    interrupt (SIGTERM too, under utils.cli.install_signal_handlers). Stale temporary folders
    of dead processes are removed first (utils/atomic.py). `digests` (file name -> sha256, filled
    by a ShardWriter given the same dict) go into the manifest instead of reading those files
    again."""
    from ..utils.atomic import atomic_folder
    from ..utils.manifest import write_manifest

    out = Path(out).absolute()
    check_output_free(out)
    # replaces an empty folder only; the manifest is written here, once the digests are known
    with atomic_folder(out, manifest=False, fsync=fsync, replace=False) as tmp:
        yield tmp
        check_output_free(out)  # nothing appeared there meanwhile
        write_manifest(tmp, known=digests)
