"""T5X checkpoint reading: the parameter index, lazy (name, tensor) iteration, the spec forms
t5x writes (file and gcs kvstores, trailing '/', older top-level 'path'), inline and zarr
arrays, and errors that name the parameter and the file."""

import json
import shutil

import msgpack
import numpy as np
import pytest
import torch
from conftest import tiny_config
from t5x_fixture import ndarray_ext, random_params, t5x_shapes, write_checkpoint, write_zarr

from openmoe.checkpoint import CheckpointError, T5XCheckpoint, iter_params

BF16 = "decoder/layers_1/mlp/expert/wo/kernel"
INLINE = "decoder/layers_0/pre_mlp_layer_norm/scale"
CHUNKED = "decoder/decoder_norm/scale"


@pytest.fixture
def ckpt_dir(tmp_path):
    params = random_params(tiny_config(), bf16={BF16})
    return write_checkpoint(tmp_path / "checkpoint_100", params, inline={INLINE}, chunked={CHUNKED}), params


def test_index_has_names_shapes_dtypes_and_sources(ckpt_dir):
    folder, params = ckpt_dir
    with T5XCheckpoint(folder) as ckpt:
        assert ckpt.version == 3
        assert ckpt.shapes() == t5x_shapes(tiny_config())
        assert ckpt.params[BF16].dtype == torch.bfloat16
        assert ckpt.params["token_embedder/embedding"].dtype == torch.float32
        assert ckpt.params[INLINE].source == folder / "checkpoint" and ckpt.params[INLINE].array is None
        assert ckpt.params[CHUNKED].source == folder / "checkpoint"
        assert ckpt.params["decoder/layers_0/mlp/wo/kernel"].source == folder / "target.decoder.layers_0.mlp.wo.kernel"


def test_iter_params_yields_every_tensor_exactly(ckpt_dir):
    folder, params = ckpt_dir
    seen = []
    for name, t in iter_params(folder, workers=2):
        assert isinstance(t, torch.Tensor) and t.dtype == params[name].dtype
        assert torch.equal(t, params[name]), name
        seen.append(name)
    assert seen == list(params)  # file order, which is the order they were written
    names = [BF16, "token_embedder/embedding"]
    assert [n for n, _ in iter_params(folder / "checkpoint", names)] == names


@pytest.mark.parametrize("kvstore", ["file", "gcs"])
def test_kvstore_drivers_resolve_relative_to_the_folder(tmp_path, kvstore):
    params = random_params(tiny_config(num_hidden_layers=2))
    folder = write_checkpoint(tmp_path / "c", params, kvstore=kvstore)
    moved = tmp_path / "elsewhere"
    shutil.move(folder, moved)  # relative paths: a moved checkpoint still reads
    for name, t in iter_params(moved):
        assert torch.equal(t, params[name])


def _single_param_checkpoint(tmp_path, spec, version=3):
    folder = tmp_path / "c"
    folder.mkdir(exist_ok=True)
    root = {"version": version, "optimizer": {"target": {"w": spec}}}
    (folder / "checkpoint").write_bytes(msgpack.packb(root, use_bin_type=True))
    return folder


def test_older_spec_forms(tmp_path):
    t = torch.randn(5, 3)
    write_zarr(tmp_path / "c" / "target.w", t, (2, 3))
    meta = {"shape": [5, 3], "chunks": [2, 3], "compressor": {"id": "gzip"}}
    forms = [
        {"driver": "zarr", "kvstore": {"driver": "file"}, "path": "target.w", "metadata": meta},  # ts < 0.1.14
        {"driver": "zarr", "kvstore": {"driver": "gcs", "bucket": "t5x-dummy-bucket"}, "path": "target.w"},
        {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "c" / "target.w") + "/"}},
        {"driver": "zarr", "kvstore": "file://" + str(tmp_path / "c" / "target.w") + "/"},
    ]
    for spec in forms:
        folder = _single_param_checkpoint(tmp_path, spec)
        (name, got), = list(iter_params(folder))
        assert name == "w" and torch.equal(got, t), spec


def test_plain_flax_root_and_versions(tmp_path):
    f = tmp_path / "c"
    f.mkdir()
    (f / "checkpoint").write_bytes(msgpack.packb({"target": {"w": ndarray_ext(torch.ones(3))}}))
    assert [n for n, _ in iter_params(f)] == ["w"]  # version 0: the root is the optimizer
    _single_param_checkpoint(tmp_path, ndarray_ext(torch.ones(3)), version=1)
    with pytest.raises(CheckpointError, match=r"checkpoint: checkpoint version 1 is not supported"):
        T5XCheckpoint(f)


def test_missing_array_folder_names_parameter_and_folder(ckpt_dir):
    folder, _ = ckpt_dir
    shutil.rmtree(folder / "target.decoder.layers_2.mlp.wi_1.kernel")
    with pytest.raises(CheckpointError, match=r"^decoder/layers_2/mlp/wi_1/kernel: array folder "
                                              r".*target\.decoder\.layers_2\.mlp\.wi_1\.kernel is missing"):
        T5XCheckpoint(folder)


def test_zarray_shape_differing_from_the_spec_is_named(ckpt_dir):
    folder, _ = ckpt_dir
    zarray = folder / "target.decoder.layers_0.mlp.wo.kernel" / ".zarray"
    meta = json.loads(zarray.read_text())
    meta["shape"] = [48, 33]
    zarray.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"^decoder/layers_0/mlp/wo/kernel: shape \[48, 33\] in "
                                              r".*\.zarray does not match \[48, 32\] recorded in .*checkpoint"):
        T5XCheckpoint(folder)


def test_leaf_that_is_not_an_array_is_named(tmp_path):
    folder = _single_param_checkpoint(tmp_path, "hello")
    with pytest.raises(CheckpointError, match=r"^w: not an array \(a str\) in .*checkpoint"):
        T5XCheckpoint(folder)
    folder = _single_param_checkpoint(tmp_path, {"driver": "zarr", "kvstore": {"driver": "s3", "path": "x"}})
    with pytest.raises(CheckpointError, match=r"^w: kvstore driver 's3'"):
        T5XCheckpoint(folder)


def test_no_checkpoint_file(tmp_path):
    with pytest.raises(CheckpointError, match="no T5X msgpack 'checkpoint' file"):
        T5XCheckpoint(tmp_path)


def test_arrays_written_by_tensorstore(tmp_path):
    """Cross-check against the real writer where it is installed (not a project dependency)."""
    ts = pytest.importorskip("tensorstore")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    folder = tmp_path / "c"
    arrays = {"a": (np.arange(70, dtype=np.float32).reshape(10, 7), [4, 7]),
              "b": (np.linspace(-3, 3, 15, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(5, 3), [2, 2])}
    target = {}
    for name, (a, chunks) in arrays.items():
        spec = ts.Spec({"driver": "zarr", "dtype": a.dtype.name,
                        "kvstore": {"driver": "file", "path": f"target.{name}"},
                        "metadata": {"compressor": {"id": "gzip"}, "shape": list(a.shape), "chunks": chunks}})
        absolute = spec.to_json()
        absolute["kvstore"]["path"] = str(folder / absolute["kvstore"]["path"])
        ts.open(absolute, create=True, open=True).result()[...].write(a).result()
        target[name] = spec.to_json()  # what t5x stores: the relative spec
    (folder / "checkpoint").write_bytes(msgpack.packb({"version": 3, "optimizer": {"target": target}}))
    got = dict(iter_params(folder))
    assert torch.equal(got["a"], torch.from_numpy(arrays["a"][0]))
    assert got["b"].dtype == torch.bfloat16
    assert torch.equal(got["b"].float(), torch.from_numpy(arrays["b"][0].astype(np.float32)))
