"""The msgpack structural scanner: leaf byte ranges for every msgpack type, lazy shapes of
flax's inline arrays, and the optimizer state skipped without being decoded."""

import msgpack
import numpy as np
import pytest
import torch
from t5x_fixture import chunked_inline, ndarray_ext, scalar_ext

from openmoe.checkpoint.errors import CheckpointError
from openmoe.checkpoint.msgpack_tree import MsgpackTree

# One value of every msgpack encoding width, so a wrong header length shows up as a wrong range.
EVERY_KIND = {
    "nil": None, "t": True, "f": False, "pfix": 7, "nfix": -5, "u8": 200, "u16": 60000,
    "u32": 2**31, "u64": 2**63, "i8": -100, "i16": -30000, "i32": -2**31, "i64": -2**62,
    "f64": 1.5, "fixstr": "abc", "str8": "x" * 40, "str16": "y" * 300, "str32": "z" * 70000,
    "bin8": b"\x01" * 10, "bin16": b"\x02" * 300, "bin32": b"\x03" * 70000,
    "arr": [1, 2, 3], "arr16": list(range(20)), "arr32": [0] * 70000,
    "map16": {str(i): i for i in range(20)}, "fixext1": msgpack.ExtType(9, b"a"),
    "fixext16": msgpack.ExtType(9, b"b" * 16), "ext8": msgpack.ExtType(9, b"c" * 20),
    "ext16": msgpack.ExtType(9, b"d" * 300), "ext32": msgpack.ExtType(9, b"e" * 70000),
}


def _write(tmp_path, obj):
    f = tmp_path / "checkpoint"
    f.write_bytes(msgpack.packb(obj, use_bin_type=True))
    return MsgpackTree(f)


def test_leaf_ranges_cover_every_msgpack_kind(tmp_path):
    tree = _write(tmp_path, {"a": {"b": EVERY_KIND}, "after": 1})
    leaves = tree.leaves("a")
    expected = []
    for k in EVERY_KIND:  # file order, the nested map expanded in place
        expected += [f"b/map16/{i}" for i in range(20)] if k == "map16" else [f"b/{k}"]
    assert [leaf.name for leaf in leaves] == expected
    by_name = {leaf.name: leaf for leaf in leaves}
    for key, value in EVERY_KIND.items():
        if key == "map16":
            continue
        raw = tree._mm[by_name[f"b/{key}"].start:by_name[f"b/{key}"].end]
        assert msgpack.unpackb(raw, raw=False, strict_map_key=False) == value, key
    assert tree.decode_at(tree.find("after")) == 1  # the scan lands exactly after the big map
    tree.close()


def test_inline_arrays_decode_and_peek(tmp_path):
    x = torch.randn(3, 4)
    bf = torch.randn(5).to(torch.bfloat16)
    big = torch.randn(7, 3)
    zero_d = np.asarray(np.float32(2.5))  # its payload is 16 bytes: msgpack makes it a fixext16
    tree = _write(tmp_path, {"t": {"x": ndarray_ext(x), "bf": ndarray_ext(bf), "big": chunked_inline(big, 5),
                                   "s": ndarray_ext(zero_d), "step": scalar_ext(np.int32(7))}})
    leaves = {leaf.name: leaf for leaf in tree.leaves("t")}
    assert set(leaves) == {"x", "bf", "big", "s", "step"}
    assert tree.peek_array(leaves["x"]) == ((3, 4), "float32")
    assert tree.peek_array(leaves["bf"]) == ((5,), "bfloat16")
    assert tree.peek_array(leaves["big"]) == ((7, 3), "float32")
    assert tree.peek_array(leaves["s"]) == ((), "float32")
    assert tree.peek_array(leaves["step"]) is None  # a scalar, not an array
    assert torch.equal(tree.decode(leaves["x"]), x)
    assert tree.decode(leaves["bf"]).dtype == torch.bfloat16 and torch.equal(tree.decode(leaves["bf"]), bf)
    assert torch.equal(tree.decode(leaves["big"]), big)
    assert tree.decode(leaves["s"]).item() == 2.5
    assert tree.decode(leaves["step"]) == 7
    tree.close()


def test_spec_maps_are_leaves_and_empty_maps_vanish(tmp_path):
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": "target.w/"}, "metadata": {"shape": [2]}}
    old_spec = {"driver": "zarr", "path": "target.v", "metadata": {"shape": [2]}}
    tree = _write(tmp_path, {"t": {"layer": {"w": spec, "v": old_spec}, "empty": {}}})
    leaves = tree.leaves("t")
    assert [leaf.name for leaf in leaves] == ["layer/w", "layer/v"]
    assert tree.decode(leaves[0]) == spec
    tree.close()


def test_unvisited_subtrees_are_never_decoded(tmp_path):
    # invalid bytes inside payloads of the state: decoding any of them would raise
    poison = msgpack.ExtType(1, b"\xc1" * 1000)
    tree = _write(tmp_path, {"optimizer": {"state": {"v": poison, "w": [poison] * 3},
                                           "target": {"w": ndarray_ext(torch.ones(2))}}})
    (leaf,) = tree.leaves("optimizer", "target")
    assert torch.equal(tree.decode(leaf), torch.ones(2))
    tree.close()


def test_truncated_and_foreign_files_are_named(tmp_path):
    f = tmp_path / "checkpoint"
    f.write_bytes(msgpack.packb({"optimizer": {"target": {"w": ndarray_ext(torch.ones(100))}}})[:-50])
    tree = MsgpackTree(f)
    with pytest.raises(CheckpointError, match=r"checkpoint: msgpack data ends early .*truncated"):
        tree.leaves("optimizer", "target")
    tree.close()
    f.write_bytes(b"\xc1not msgpack")
    tree = MsgpackTree(f)
    with pytest.raises(CheckpointError, match="not msgpack data"):
        tree.leaves("optimizer")
    tree.close()
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        MsgpackTree(f)
