"""Streaming safetensors shards: the plan, files safetensors itself reads back, the index, and
the temporary folder that becomes the output only on success."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from openmoe.checkpoint import CheckpointError
from openmoe.checkpoint.shards import (INDEX_NAME, ShardWriter, TensorSpec, output_folder, parse_size,
                                       plan_shards)


def _specs(sizes, dtype=torch.float32):
    return [TensorSpec(f"t{i}", (n,), dtype) for i, n in enumerate(sizes)]


def test_plan_is_greedy_in_order_and_isolates_big_tensors():
    plan = plan_shards(_specs([10, 10, 10, 50, 5]), max_shard_bytes=100)  # 40, 40, 40, 200, 20 bytes
    assert [[t.name for t in s] for s in plan] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]
    assert plan_shards([], 100) == []


@pytest.mark.parametrize("text, n", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                     ("1.5 kb", 1500), ("123", 123), (77, 77)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["lots", "-1GB", "0"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_written_shards_read_back_with_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "c": torch.randn(2, 2, 2, generator=g), "d": torch.randn(4, 3, generator=g)}
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    shards = plan_shards(specs, max_shard_bytes=64)
    w = ShardWriter(tmp_path, shards, fsync=False)
    for n, t in tensors.items():
        w.write(n, list(t.split(2)) if t.dim() > 1 else [t])  # several blocks per tensor
    w.finish()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for n, t in tensors.items():
        with safe_open(tmp_path / index["weight_map"][n], "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert torch.equal(f.get_tensor(n), t)
    for name in set(index["weight_map"].values()):
        header_len = int.from_bytes((tmp_path / name).read_bytes()[:8], "little")
        assert header_len % 8 == 0  # data 8-byte aligned


def test_writer_refuses_out_of_plan_input(tmp_path):
    w = ShardWriter(tmp_path, plan_shards(_specs([4, 4]), 1000), fsync=False)
    with pytest.raises(RuntimeError, match="got t1, the plan expects t0"):
        w.write("t1", [torch.zeros(4)])
    with pytest.raises(RuntimeError, match="got 12 bytes, planned 16"):
        w.write("t0", [torch.zeros(3)])
    w.abort()


def test_output_folder_appears_only_on_success(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with output_folder(out) as tmp:
            (tmp / "x").write_text("partial")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []  # neither the output nor the temporary folder
    with output_folder(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "x").write_text("done")
    assert (out / "x").read_text() == "done" and os.listdir(tmp_path) == ["out"]


def test_output_folder_refuses_existing_content(tmp_path):
    (tmp_path / "empty").mkdir()
    with output_folder(tmp_path / "empty") as tmp:  # an empty folder may be replaced
        (tmp / "y").write_text("1")
    assert (tmp_path / "empty" / "y").exists()
    with pytest.raises(CheckpointError, match="already exists and is not an empty folder"):
        with output_folder(tmp_path / "empty"):
            pass
    with pytest.raises(CheckpointError, match="parent folder .* does not exist"):
        with output_folder(tmp_path / "no" / "such"):
            pass


def test_tensor_regions_in_any_order_read_back(tmp_path):
    """Regions written in place, shuffled: whole rows (pwrite), column blocks and a 3-D block
    that is not one byte range (mmap), single rows of a 3-D tensor, a 0-d tensor."""
    g = torch.Generator().manual_seed(1)
    tensors = {"m": torch.randn(7, 5, generator=g), "e": torch.randn(3, 4, 6, generator=g),
               "s": torch.tensor(2.5), "b": torch.randn(5, 3, generator=g).to(torch.bfloat16)}
    regions = {
        "m": [(slice(3, 7), slice(0, 5)), (slice(0, 3), slice(2, 5)), (slice(0, 3), slice(0, 2))],
        "e": [(slice(2, 3), slice(2, 4), slice(0, 6)), (slice(0, 3), slice(0, 2), slice(0, 6)),
              (slice(1, 2), slice(3, 4), slice(0, 6)), (slice(0, 2), slice(2, 3), slice(0, 6)),
              (slice(0, 1), slice(3, 4), slice(0, 6))],
        "s": [(slice(0, 1),)],
        "b": [(slice(0, 5), slice(1, 3)), (slice(0, 5), slice(0, 1))],
    }
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    w = ShardWriter(tmp_path, plan_shards(specs, max_shard_bytes=100), fsync=False)
    for n, t in tensors.items():
        bits = (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).reshape(t.shape or (1,)).numpy()
        with w.tensor(n) as slot:
            for r in regions[n]:
                slot.write(r, bits[r])
    w.finish()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    for n, t in tensors.items():
        with safe_open(tmp_path / index["weight_map"][n], "pt") as f:
            assert torch.equal(f.get_tensor(n), t), n


def test_tensor_refuses_a_missing_region(tmp_path):
    w = ShardWriter(tmp_path, plan_shards([TensorSpec("m", (4, 2), torch.float32)], 1000), fsync=False)
    with pytest.raises(RuntimeError, match="got 16 bytes, planned 32"):
        with w.tensor("m") as slot:
            slot.write((slice(0, 2), slice(0, 2)), torch.zeros(2, 2).numpy())
    w.abort()


def test_digests_are_each_shards_sha256_hashed_while_writing(tmp_path, monkeypatch):
    """ShardWriter(digests=...) gives the sha256 of each shard's final bytes (regions written out
    of order, through pwrite and the mmap), and output_folder puts them in the manifest without
    reading those files again: only the other files are hashed at the end."""
    import hashlib

    import openmoe.utils.manifest as manifest

    g = torch.Generator().manual_seed(2)
    tensors = {"m": torch.randn(7, 5, generator=g), "e": torch.randn(3, 4, 6, generator=g),
               "z": torch.zeros(0, 3), "b": torch.randn(5, 3, generator=g).to(torch.bfloat16)}
    regions = {"m": [(slice(3, 7), slice(0, 5)), (slice(0, 3), slice(2, 5)), (slice(0, 3), slice(0, 2))],
               "e": [(slice(0, 3), slice(2, 4), slice(0, 6)), (slice(0, 3), slice(0, 2), slice(0, 6))],
               "z": [], "b": [(slice(0, 5), slice(1, 3)), (slice(0, 5), slice(0, 1))]}
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    read = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda p: read.append(os.path.basename(p)) or real(p))
    digests: dict = {}
    with output_folder(tmp_path / "out", fsync=False, digests=digests) as tmp:
        w = ShardWriter(tmp, plan_shards(specs, max_shard_bytes=100), fsync=False, digests=digests)
        for n, t in tensors.items():
            bits = (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()
            with w.tensor(n) as slot:
                for r in regions[n]:
                    slot.write(r, bits[r])
        w.finish()
        w.abort()
    out = tmp_path / "out"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == 3 and sorted(digests) == shards
    files = json.loads((out / "manifest.json").read_text())["files"]
    for name in shards:
        assert digests[name] == files[name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert read == [INDEX_NAME]  # the shards were not read a second time
