"""examples/widenet: a WideNet (shared attention + shared MoELayer across blocks) trained on
scikit-learn's digits, single process and expert-parallel under torchrun."""

import copy
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")


pytest.importorskip("sklearn", reason="the WideNet example trains on scikit-learn's digits")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "widenet"
# small and fast: 4x4 patches (5 tokens), 2 blocks, hidden 32
SMALL = ["--hidden", "32", "--layers", "2", "--mlp-ratio", "2", "--batch-size", "32", "--lr", "3e-3",
         "--threads", "1", "--seed", "0"]


def _load(name, file):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE / file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


widenet = _load("widenet", "widenet.py")  # train.py's `from widenet import WideNet` finds this one
train = _load("widenet_train", "train.py")


def test_single_process_training_learns_digits(capsys):
    threads = torch.get_num_threads()
    try:
        acc = train.main(SMALL + ["--epochs", "4"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert re.search(r"^epoch +4/4 .*test acc .*expert load \[", out, re.M), out
    final = float(re.search(r"^final test accuracy ([0-9.]+)$", out, re.M).group(1))
    assert final == pytest.approx(acc, abs=1e-4)
    assert acc >= 0.8, out  # chance is 0.1; this run gets ~0.96


def test_torchrun_expert_parallel(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(EXAMPLE / "train.py"), *SMALL, "--epochs", "1", "--out", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log
    assert "world 2 (EP=2)" in p.stdout, log
    m = re.search(r"^final test accuracy ([0-9.]+)$", p.stdout, re.M)
    assert m, log
    acc = float(m.group(1))
    assert acc > 0.2, log
    assert p.stdout.count("final test accuracy") == 1  # only rank 0 prints

    # the saved model is the full (unsharded) one: it loads into a single-process WideNet and
    # reproduces the accuracy the two expert-parallel ranks measured together
    ckpt = torch.load(tmp_path / "model.pt", weights_only=False)
    a = ckpt["args"]
    model = widenet.WideNet(image_size=8, patch_size=ckpt["patch_size"], in_channels=1, num_classes=10,
                            hidden=a["hidden"], layers=a["layers"], heads=a["heads"], num_experts=a["experts"],
                            intermediate_size=a["mlp_ratio"] * a["hidden"])
    assert ckpt["model"]["moe.experts.w_in"].shape[0] == a["experts"]
    model.load_state_dict(ckpt["model"])
    _, (xte, yte), _ = train.load_data("digits", None)
    assert train.evaluate(model, xte, yte, 256, 0, 1) == pytest.approx(acc, abs=1e-4)


def test_moe_layer_is_shared_and_gets_the_sum_of_block_gradients():
    torch.manual_seed(0)
    L = 3
    model = widenet.WideNet(hidden=16, layers=L, heads=2, num_experts=4, aux_loss=0.01, z_loss=0.001)
    assert widenet.count_moe_layers(model) == 1
    assert sum(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules()) == 1
    assert len({id(b.ln_moe) for b in model.blocks}) == L  # each block its own LayerNorms
    assert not any(k.startswith("blocks.") and ".moe." in k for k in model.state_dict())

    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))

    def loss_of(out):
        logits, aux, load = out
        assert load.shape == (L, 4) and aux is not None
        return F.cross_entropy(logits, y) + aux, logits, aux

    loss, logits, aux = loss_of(model(x))
    loss.backward()
    shared = {n: p.grad.clone() for n, p in model.moe.named_parameters()}

    # the same network with L separate copies of the shared layer (same weights), one per block
    model.zero_grad()
    copies = [copy.deepcopy(model.moe) for _ in range(L)]
    loss_u, logits_u, aux_u = loss_of(model(x, moe_layers=copies))
    torch.testing.assert_close(logits_u, logits)
    torch.testing.assert_close(aux_u, aux)
    loss_u.backward()
    for name, g in shared.items():
        per_block = [dict(c.named_parameters())[name].grad for c in copies]
        assert not torch.allclose(per_block[0], per_block[1])  # the blocks really contribute differently
        torch.testing.assert_close(g, torch.stack(per_block).sum(0), rtol=1e-5, atol=1e-6, msg=name)
    assert model.moe.gate_weight.grad is None  # the copies took the gradient, not the shared layer


def test_missing_data_paths_name_the_path(tmp_path):
    with pytest.raises(SystemExit, match=re.escape(str(tmp_path / "nope"))):
        train.load_data(f"cifar10:{tmp_path / 'nope'}", None)
    with pytest.raises(SystemExit, match=re.escape(str(tmp_path / "nope"))):
        train.load_data(f"folder:{tmp_path / 'nope'}", None)


def test_image_folder_of_npy_files(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(["a", "b"]):
        (tmp_path / name).mkdir()
        for i in range(10):
            np.save(tmp_path / name / f"{i}.npy", rng.random((6, 6)).astype(np.float32) + c)
    (xtr, ytr), (xte, yte), classes = train.load_data(f"folder:{tmp_path}", 8)
    assert classes == 2 and xtr.shape == (16, 1, 8, 8) and xte.shape == (4, 1, 8, 8)
    assert sorted(torch.cat([ytr, yte]).tolist()) == [0] * 10 + [1] * 10
