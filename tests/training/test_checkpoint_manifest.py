"""Checkpoints: a non-finite update is never saved (and the 'last good checkpoint' is true), every
checkpoint and export carries a sha256 manifest that --resume and the loaders verify, and a
checkpoint without one (DCP's .metadata is a pickle) is refused unless trusted."""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_run_setup
from openmoe.training import Trainer, TrainingDiverged, load_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from openmoe.cli import train  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run (checkpoint step_00000002 and final/), copied by each test that damages it."""
    d = tmp_path_factory.mktemp("manifest")
    args = make_run_setup(d) + ["--steps", "2", "--save_every", "2"]
    t = Trainer(load_config(None, args), log=lambda *a: None)
    t.setup()
    t.train()
    return d, args


def _copy(trained, tmp_path):
    d, args = trained
    out = tmp_path / "run"
    shutil.copytree(d / "run", out)
    return out, args[:args.index("--out_dir")] + ["--out_dir", str(out)] + args[args.index("--out_dir") + 2:]


def _flip(path: Path, at: int = 200) -> None:
    b = bytearray(path.read_bytes())
    b[at] ^= 0xFF
    path.write_bytes(bytes(b))


def test_checkpoint_and_export_have_manifests(trained):
    from openmoe.utils.manifest import verify_manifest

    run = trained[0] / "run"
    for folder in (run / "checkpoints" / "step_00000002", run / "final"):
        assert verify_manifest(folder)
    assert ".metadata" in (run / "checkpoints" / "step_00000002" / "manifest.json").read_text()


def test_diverged_update_is_not_saved_and_the_kept_checkpoint_resumes(run_setup):
    cfg = load_config(None, run_setup + ["--steps", "4", "--save_every", "2", "--export_final", "false"])
    t = Trainer(cfg, log=lambda *a: None)
    t.setup()
    t.cfg.steps = 2
    t.train()
    t.cfg.steps, t.cfg.save_every = 4, 1
    t.scheduler.base_lrs = [1e39] * len(t.scheduler.base_lrs)  # the next update overflows the weights
    for g in t.optimizer.param_groups:
        g["lr"] = 1e39
    with pytest.raises(TrainingDiverged) as e:
        t.train()
    ck = Path(cfg.out_dir) / "checkpoints"
    assert "step 3" in str(e.value) and "not finite" in str(e.value) and str(ck / "step_00000002") in str(e.value)
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000002"]
    t2 = Trainer(load_config(None, run_setup + ["--steps", "4"]), resume=True, log=lambda *a: None)
    t2.setup()  # the kept checkpoint is a good one
    assert t2.step == 2


def test_cli_divergence_before_any_checkpoint(run_setup, capsys, monkeypatch):
    monkeypatch.setenv("OPENMOE_NO_TQDM", "1")
    assert train.main(run_setup + ["--lr", "1e39", "--steps", "2", "--save_every", "1"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not finite" in err and "no checkpoint was saved yet" in err
    out = Path(run_setup[run_setup.index("--out_dir") + 1])
    assert not list((out / "checkpoints").glob("*")) and not (out / "final").exists()


def test_resume_verifies_the_manifest_names_the_file(trained, tmp_path):
    out, args = _copy(trained, tmp_path)
    distcp = out / "checkpoints" / "step_00000002" / "__0_0.distcp"
    _flip(distcp)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OPENMOE_NO_TQDM="1")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--steps", "3", "--resume"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and str(distcp) in r.stderr and "sha256" in r.stderr
    assert not (out / "checkpoints" / "step_00000003").exists()


def test_crafted_metadata_is_never_unpickled(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENMOE_NO_TQDM", "1")
    out, args = _copy(trained, tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    step = out / "checkpoints" / "step_00000002"
    (step / ".metadata").write_bytes(pickle.dumps(Evil()))
    assert train.main(args + ["--steps", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert str(step / ".metadata") in err and err.count("\n") == 1
    (step / "manifest.json").unlink()  # no manifest: refused unless trusted
    assert train.main(args + ["--steps", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no manifest.json" in err and "--trust-checkpoint" in err and err.count("\n") == 1
    assert not marker.exists()


def test_trust_checkpoint_resumes_without_manifest(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENMOE_NO_TQDM", "1")
    out, args = _copy(trained, tmp_path)
    (out / "checkpoints" / "step_00000002" / "manifest.json").unlink()
    assert train.main(args + ["--steps", "3", "--resume", "--trust-checkpoint", "--export_final", "false"]) == 0
    assert (out / "checkpoints" / "step_00000003" / "manifest.json").is_file()


def test_disk_full_during_a_save_is_named_and_leaves_no_checkpoint(run_setup, capsys, monkeypatch):
    import collections

    from openmoe.training import checkpoint as ckpt

    monkeypatch.setenv("OPENMOE_NO_TQDM", "1")

    def full(*a, **k):  # what torch.save raises when the disk fills
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4096")

    monkeypatch.setattr(ckpt.torch, "save", full)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: collections.namedtuple("u", "total used free")(1, 1, 0))
    assert train.main(run_setup + ["--steps", "1"]) == 2
    err = capsys.readouterr().err
    ck = Path(run_setup[run_setup.index("--out_dir") + 1]) / "checkpoints"
    assert err == f"train.py: error: {ck / '.tmp_step_00000001'}: disk full (ENOSPC)\n"
    assert list(ck.iterdir()) == []
