"""The flax msgpack `checkpoint` file of a T5X checkpoint: an index of its leaves, read lazily.

flax.serialization writes a nested map whose leaves are msgpack ExtType 1 (an ndarray packed as
`(shape, dtype name, C-order bytes)`), ExtType 3 (a numpy scalar, same payload), plain msgpack
values, tensorstore spec maps, or `{'__msgpack_chunked_array__': True, 'shape': ..., 'chunks':
...}` for arrays over 1 GiB split into flat pieces.

We never unpack the whole file: a small structural scanner walks the msgpack headers over an
mmap, records the byte range of every leaf under the subtree we want, and jumps over everything
else (the optimizer state) without reading its payloads. msgpack.Unpacker.skip() would not do:
it buffers each skipped object whole. A leaf is decoded (with msgpack) only when asked for.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import torch

from .errors import CheckpointError

EXT_NDARRAY, EXT_COMPLEX, EXT_NPSCALAR = 1, 2, 3
CHUNKED_KEY = "__msgpack_chunked_array__"


def is_spec_keys(keys) -> bool:
    """A map with a 'driver' plus a 'kvstore' or (older tensorstore) a 'path' is a tensorstore
    spec: a leaf, not a subtree of parameters."""
    return "driver" in keys and ("kvstore" in keys or "path" in keys)


# Fixed-size msgpack headers: first byte -> (struct format of the length/value, kind).
_SIZED = {
    0xC4: (">B", "bin"), 0xC5: (">H", "bin"), 0xC6: (">I", "bin"),
    0xD9: (">B", "str"), 0xDA: (">H", "str"), 0xDB: (">I", "str"),
    0xDC: (">H", "array"), 0xDD: (">I", "array"),
    0xDE: (">H", "map"), 0xDF: (">I", "map"),
    0xC7: (">B", "ext"), 0xC8: (">H", "ext"), 0xC9: (">I", "ext"),
}
_FIXED_WIDTH = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
                0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}


@dataclass(frozen=True)
class Leaf:
    """A leaf of the tree: its slash-joined path and the byte range of its msgpack object."""

    name: str
    start: int
    end: int


class _Scanner:
    """Reads msgpack headers at byte offsets of a buffer; never decodes payloads it skips."""

    def __init__(self, buf, file: Path):
        self.buf, self.file = buf, file

    def _need(self, pos: int, n: int) -> None:
        if pos + n > len(self.buf):
            raise CheckpointError(f"{self.file}: msgpack data ends early at byte {pos} (truncated file?)")

    def header(self, pos: int) -> tuple[str, int, int]:
        """(kind, count or payload length, offset after the header) of the object at pos."""
        self._need(pos, 1)
        b = self.buf[pos]
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            return "scalar", 0, pos + 1
        if 0x80 <= b <= 0x8F:
            return "map", b & 0x0F, pos + 1
        if 0x90 <= b <= 0x9F:
            return "array", b & 0x0F, pos + 1
        if 0xA0 <= b <= 0xBF:
            return "str", b & 0x1F, pos + 1
        if b in _FIXED_WIDTH:
            return "bin", _FIXED_WIDTH[b], pos + 1  # a number: skip its fixed-width payload
        if b in _FIXEXT:
            return "ext", _FIXEXT[b] + 1, pos + 1  # like ext: the type byte, then the data
        if b in _SIZED:
            fmt, kind = _SIZED[b]
            width = struct.calcsize(fmt)
            self._need(pos + 1, width)
            (n,) = struct.unpack_from(fmt, self.buf, pos + 1)
            extra = 1 if kind == "ext" else 0  # ext: the type byte follows the length
            return kind, n + extra, pos + 1 + width
        raise CheckpointError(f"{self.file}: not msgpack data (byte 0x{b:02x} at offset {pos})")

    def skip(self, pos: int) -> int:
        """Offset just after the object at pos. Iterative, so deep trees cannot overflow."""
        pending = 1
        while pending:
            kind, n, pos = self.header(pos)
            pending -= 1
            if kind == "map":
                pending += 2 * n
            elif kind == "array":
                pending += n
            elif kind != "scalar":
                self._need(pos, n)
                pos += n
        return pos

    def string(self, pos: int) -> tuple[str, int]:
        kind, n, start = self.header(pos)
        if kind != "str":
            raise CheckpointError(f"{self.file}: expected a string map key at byte {pos}")
        return bytes(self.buf[start:start + n]).decode("utf-8"), start + n

    def map_items(self, pos: int):
        """Yield (key, value offset) of the map at pos; the caller need not read the values."""
        kind, n, pos = self.header(pos)
        assert kind == "map"
        for _ in range(n):
            key, pos = self.string(pos)
            yield key, pos
            pos = self.skip(pos)

    def first_child(self, pos: int) -> int | None:
        """Offset of the first value of the map or array at pos (None if empty)."""
        kind, n, start = self.header(pos)
        if n == 0 or kind not in ("map", "array"):
            return None
        return self.skip(start) if kind == "map" else start  # a map: skip the first key

    def kind(self, pos: int) -> str:
        return self.header(pos)[0]


class MsgpackTree:
    """Index of one flax msgpack file. `leaves(path)` lists the leaves under a key path;
    `decode(leaf)` unpacks one leaf. The file stays mapped, not read, until closed."""

    def __init__(self, file: str | Path):
        self.file = Path(file)
        try:
            self._fh = open(self.file, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.file}: cannot open ({e.strerror})") from None
        size = self.file.stat().st_size
        if size == 0:
            self._fh.close()
            raise CheckpointError(f"{self.file}: empty file")
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._scan = _Scanner(self._mm, self.file)

    def close(self) -> None:
        self._mm.close()
        self._fh.close()

    def find(self, *keys: str) -> int | None:
        """Offset of the value at the key path from the root, or None if absent."""
        pos = 0
        for key in keys:
            if self._scan.kind(pos) != "map":
                return None
            pos = next((p for k, p in self._scan.map_items(pos) if k == key), None)
            if pos is None:
                return None
        return pos

    def decode_at(self, pos: int):
        return self.decode(Leaf("", pos, self._scan.skip(pos)))

    def leaves(self, *keys: str) -> list[Leaf]:
        """Every leaf under the map at the key path, in file order; empty maps are dropped."""
        pos = self.find(*keys)
        if pos is None:
            raise CheckpointError(f"{self.file}: no '{'/'.join(keys)}' tree in the checkpoint")
        out: list[Leaf] = []
        stack = [("", pos)]
        while stack:
            prefix, pos = stack.pop()
            if self._is_subtree(pos):
                items = list(self._scan.map_items(pos))
                stack.extend((f"{prefix}{k}/", p) for k, p in reversed(items))
            else:
                out.append(Leaf(prefix.rstrip("/"), pos, self._scan.skip(pos)))
        return out

    def _is_subtree(self, pos: int) -> bool:
        if self._scan.kind(pos) != "map":
            return False
        keys = {k for k, _ in self._scan.map_items(pos)}
        return CHUNKED_KEY not in keys and not is_spec_keys(keys)

    def peek_array(self, leaf: Leaf) -> tuple[tuple[int, ...], str] | None:
        """(shape, dtype name) of an inline array leaf without decoding its data; None if the
        leaf is not an inline array (a spec map, a scalar)."""
        kind, n, pos = self._scan.header(leaf.start)
        if kind == "map":
            keys = dict(self._scan.map_items(leaf.start))
            if not {CHUNKED_KEY, "shape", "chunks"} <= keys.keys():
                return None
            shape = tuple(int(s) for s in _as_tuple(self.decode_at(keys["shape"])))
            first = self._scan.first_child(keys["chunks"])  # the pieces share one dtype
            return shape, (self._peek_ext(first)[1] if first is not None else "float32")
        if kind != "ext" or self._mm[pos] != EXT_NDARRAY:
            return None
        return self._peek_ext(leaf.start)

    def _peek_ext(self, pos: int) -> tuple[tuple[int, ...], str]:
        _, n, start = self._scan.header(pos)
        payload = start + 1  # after the ext type byte
        u = msgpack.Unpacker(raw=False)
        u.feed(self._mm[payload:payload + min(n - 1, 4096)])  # shape and dtype come first
        u.read_array_header()
        shape, dtype = u.unpack(), u.unpack()
        return tuple(int(s) for s in shape), dtype

    def decode(self, leaf: Leaf):
        """The leaf as Python data: a torch tensor (ext types, chunked arrays), a spec dict, or
        a scalar."""
        try:
            value = msgpack.unpackb(self._mm[leaf.start:leaf.end], ext_hook=_ext_hook, raw=False,
                                    strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as e:
            raise CheckpointError(f"{leaf.name}: cannot decode its value in {self.file} ({e})") from None
        if isinstance(value, dict) and CHUNKED_KEY in value:
            value = _unchunk(value, leaf.name, self.file)
        return value


def tensor_from_payload(data: bytes) -> torch.Tensor:
    """flax's ndarray payload: msgpack (shape, dtype name, C-order bytes), as a torch tensor.
    numpy has no bfloat16, so those bytes are read as uint16 and viewed as torch.bfloat16."""
    shape, dtype_name, buf = msgpack.unpackb(data, raw=True)
    name = dtype_name.decode() if isinstance(dtype_name, bytes) else dtype_name
    bf16 = name == "bfloat16"
    # bytearray: a writable copy, so torch owns ordinary memory (frombuffer on bytes is read-only)
    arr = np.frombuffer(bytearray(buf), dtype=np.dtype("<u2") if bf16 else np.dtype(name))
    t = torch.from_numpy(arr.reshape(shape))
    return t.view(torch.bfloat16) if bf16 else t


def _ext_hook(code: int, data: bytes):
    if code == EXT_NDARRAY:
        return tensor_from_payload(data)
    if code == EXT_NPSCALAR:
        return tensor_from_payload(data).item()
    if code == EXT_COMPLEX:
        re_, im = msgpack.unpackb(data)
        return complex(re_, im)
    return msgpack.ExtType(code, data)


def _as_tuple(x) -> tuple:
    # flax writes tuples as {'0': a, '1': b, ...}; accept plain lists too.
    if isinstance(x, dict):
        return tuple(x[str(i)] for i in range(len(x)))
    return tuple(x)


def _unchunk(value: dict, name: str, file: Path) -> torch.Tensor:
    try:
        shape = tuple(int(s) for s in _as_tuple(value["shape"]))
        chunks = _as_tuple(value["chunks"])
        flat = torch.cat([c.reshape(-1) for c in chunks])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{name}: malformed chunked array in {file} ({e!r})") from None
    if flat.numel() != math.prod(shape):
        raise CheckpointError(f"{name}: chunked array in {file} has {flat.numel()} elements, its shape "
                              f"{list(shape)} needs {math.prod(shape)}")
    return flat.reshape(shape)
