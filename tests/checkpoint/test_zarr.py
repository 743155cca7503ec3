"""The zarr v2 reader: chunk grids with edge chunks, gzip/zlib/raw, missing chunks as the fill
value, bfloat16, F order, "/" separators, and one-line errors for broken arrays."""

import json

import numpy as np
import pytest
import torch
from t5x_fixture import write_zarr

from openmoe.checkpoint.errors import CheckpointError
from openmoe.checkpoint.zarr import ZarrArray


def _data(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("compressor", ["gzip", "zlib", None])
@pytest.mark.parametrize("chunks", [(4, 7), (3, 5), (10, 7), (16, 16)])
def test_reads_any_chunk_grid(tmp_path, compressor, chunks):
    t = _data((10, 7))  # (3, 5): edge chunks on both axes; (16, 16): one chunk bigger than the array
    write_zarr(tmp_path / "a", t, chunks, compressor=compressor)
    arr = ZarrArray.open(tmp_path / "a", "p")
    assert arr.shape == (10, 7) and arr.chunks == chunks
    assert torch.equal(arr.read(), t)
    assert torch.equal(arr.read(workers=3), t)


def test_three_d_expert_layout_one_chunk_per_expert(tmp_path):
    t = _data((4, 6, 10))
    write_zarr(tmp_path / "e", t, (1, 6, 10))
    assert torch.equal(ZarrArray.open(tmp_path / "e").read(workers=2), t)


def test_missing_chunks_read_as_fill_value(tmp_path):
    t = _data((6, 4))
    write_zarr(tmp_path / "z", t, (2, 4), skip={(1, 0)})  # rows 2-3 never written
    expect = t.clone()
    expect[2:4] = 0  # fill_value null reads as 0 (tensorstore's convention)
    assert torch.equal(ZarrArray.open(tmp_path / "z").read(), expect)
    write_zarr(tmp_path / "f", t, (2, 4), skip={(0, 0), (2, 0)}, fill_value=0.5)
    expect = t.clone()
    expect[0:2] = 0.5
    expect[4:6] = 0.5
    assert torch.equal(ZarrArray.open(tmp_path / "f").read(), expect)


def test_bfloat16_with_edge_chunks_and_fill(tmp_path):
    t = _data((5, 3)).to(torch.bfloat16)
    write_zarr(tmp_path / "b", t, (2, 3), skip={(1, 0)}, fill_value=-1.5)
    out = ZarrArray.open(tmp_path / "b").read()
    expect = t.clone()
    expect[2:4] = -1.5
    assert out.dtype == torch.bfloat16 and torch.equal(out, expect)
    assert json.loads((tmp_path / "b" / ".zarray").read_text())["dtype"] == "bfloat16"


def test_fortran_order_and_slash_separator(tmp_path):
    t = _data((5, 6))
    write_zarr(tmp_path / "f", t, (2, 4), order="F")
    assert torch.equal(ZarrArray.open(tmp_path / "f").read(), t)
    write_zarr(tmp_path / "s", t, (2, 4), separator="/")
    assert (tmp_path / "s" / "2" / "1").is_file()
    assert torch.equal(ZarrArray.open(tmp_path / "s").read(), t)


def test_zero_d_array(tmp_path):
    t = torch.tensor(3.5)
    write_zarr(tmp_path / "s", t, ())
    assert torch.equal(ZarrArray.open(tmp_path / "s").read(), t)


def test_truncated_chunk_is_named(tmp_path):
    write_zarr(tmp_path / "a", _data((8, 8)), (4, 8))
    chunk = tmp_path / "a" / "1.0"
    chunk.write_bytes(chunk.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"^layer/w: chunk .*/a/1\.0 is truncated or corrupt"):
        ZarrArray.open(tmp_path / "a", "layer/w").read()


def test_raw_chunk_of_wrong_size_is_named(tmp_path):
    write_zarr(tmp_path / "a", _data((8, 8)), (4, 8), compressor=None)
    chunk = tmp_path / "a" / "0.0"
    chunk.write_bytes(chunk.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=r"chunk .*0\.0 holds 124 bytes, .* needs 128"):
        ZarrArray.open(tmp_path / "a", "w").read()


def test_missing_folder_and_metadata_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"^w: array folder .*/nope is missing"):
        ZarrArray.open(tmp_path / "nope", "w")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"^w: .*/empty/\.zarray is missing"):
        ZarrArray.open(tmp_path / "empty", "w")


@pytest.mark.parametrize("change, message", [
    ({"compressor": {"id": "blosc"}}, "compressor 'blosc' is not supported"),
    ({"dtype": "|O"}, "unsupported dtype"),
    ({"zarr_format": 3}, "zarr_format 3"),
    ({"filters": [{"id": "delta"}]}, "filters"),
    ({"chunks": [4]}, "do not fit shape"),
])
def test_unsupported_metadata_is_refused(tmp_path, change, message):
    write_zarr(tmp_path / "a", _data((8, 8)), (4, 8))
    meta = json.loads((tmp_path / "a" / ".zarray").read_text())
    meta.update(change)
    (tmp_path / "a" / ".zarray").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        ZarrArray.open(tmp_path / "a", "w")


def test_stored_and_decoded_sizes(tmp_path):
    t = torch.zeros(64, 64)
    write_zarr(tmp_path / "a", t, (32, 64))
    arr = ZarrArray.open(tmp_path / "a")
    assert arr.nbytes == 64 * 64 * 4
    assert 0 < arr.stored_nbytes() < arr.nbytes  # zeros compress
    assert np.dtype(arr.dtype) == np.float32
