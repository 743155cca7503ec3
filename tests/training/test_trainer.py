"""openmoe/training + train.py: loss falls, kill -9 and resume is bit-for-bit, errors are clear."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openmoe.training import Trainer, TrainingDiverged, load_config
from helpers import arg, read_metrics

ROOT = Path(__file__).resolve().parents[2]


def _run_cli(args, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OPENMOE_NO_TQDM="1", **(env_extra or {}))
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT)


def test_loss_decreases_and_exports_hf_folder(run_setup):
    args = run_setup + ["--steps", "40", "--log_every", "10", "--save_every", "20"]
    cfg = load_config(None, args)
    t = Trainer(cfg, log=lambda *a: None)
    t.setup()
    final = t.train()
    m = read_metrics(cfg.out_dir)
    assert m[0]["step"] == 1 and m[-1]["step"] == 40
    assert m[-1]["lm_loss"] < m[0]["lm_loss"] - 1.0, (m[0]["lm_loss"], m[-1]["lm_loss"])
    for k in ("aux_loss", "router_z_loss", "tokens_per_s", "mfu", "expert_load_max_over_mean", "drop_rate", "lr"):
        assert k in m[-1]
    assert len(m[-1]["drop_rate"]) == 1 and len(m[-1]["tokens_per_expert"][0]) == 4
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert type(model).__name__ == "OpenMoeForCausalLM" and len(tok) >= 100
    assert sorted(p.name for p in (Path(cfg.out_dir) / "checkpoints").iterdir()) == ["step_00000020", "step_00000040"]


def test_sigkill_and_resume_gives_the_same_loss_curve(run_setup):
    ref = _run_cli(run_setup + ["--out_dir", arg(run_setup, "--out_dir") + "_ref"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = _run_cli(run_setup, {"OPENMOE_TEST_KILL_AT_STEP": "3"})  # dies mid-run (after step 2's save)
    assert killed.returncode == -9
    resumed = _run_cli(run_setup + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a = {r["step"]: r["lm_loss"] for r in read_metrics(arg(run_setup, "--out_dir") + "_ref")}
    b = {r["step"]: r["lm_loss"] for r in read_metrics(arg(run_setup, "--out_dir"))}  # steps 1-2, then 3-6 again
    assert a == b  # exact floats: same data, same RNG, same optimizer state
    from safetensors.torch import load_file
    wa = load_file(Path(arg(run_setup, "--out_dir") + "_ref") / "final" / "model.safetensors")
    wb = load_file(Path(arg(run_setup, "--out_dir")) / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_interrupted_save_is_ignored_on_resume(run_setup):
    cfg = load_config(None, run_setup + ["--steps", "2"])
    t = Trainer(cfg, log=lambda *a: None)
    t.setup()
    t.train()
    ck = Path(cfg.out_dir) / "checkpoints"
    (ck / ".tmp_step_00000004").mkdir()  # what a kill during a save leaves
    (ck / ".tmp_step_00000004" / "model.safetensors").write_bytes(b"half")
    t2 = Trainer(load_config(None, run_setup + ["--steps", "3"]), resume=True, log=lambda *a: None)
    t2.setup()
    assert t2.step == 2 and not (ck / ".tmp_step_00000004").exists()


def test_grad_accumulation_equals_big_batch(run_setup):
    losses = []
    for bs, acc in ((4, 1), (2, 2)):
        cfg = load_config(None, run_setup + ["--batch_size", str(bs), "--grad_accum", str(acc), "--steps", "3",
                                             "--out_dir", arg(run_setup, "--out_dir") + f"_{bs}",
                                             "--model_overrides.capacity_policy", "dropless"])
        t = Trainer(cfg, log=lambda *a: None)
        t.setup()
        t.train()
        losses.append([r["lm_loss"] for r in read_metrics(cfg.out_dir)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_nan_loss_stops_without_overwriting_checkpoint(run_setup):
    cfg = load_config(None, run_setup + ["--steps", "4"])
    t = Trainer(cfg, log=lambda *a: None)
    t.setup()
    t.cfg.steps = 2
    t.train()
    ck = Path(cfg.out_dir) / "checkpoints" / "step_00000002" / "__0_0.distcp"
    before = ck.read_bytes()
    t.cfg.steps = 4
    with torch.no_grad():
        t.model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="step 2"):
        t.train()
    assert ck.read_bytes() == before


def test_freeze_router_and_experts(run_setup):
    cfg = load_config(None, run_setup + ["--steps", "1", "--freeze", "router,experts"])
    t = Trainer(cfg, log=lambda *a: None)
    t.setup()
    before = {n: p.clone() for n, p in t.model.named_parameters()}
    t.train_step()
    for n, p in t.model.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == (".mlp.gate_weight" not in n and ".mlp.experts." not in n), n


def test_packed_documents_do_not_attend_across(tiny):
    from openmoe import OpenMoeForCausalLM
    cfg = tiny(capacity_policy="dropless")
    m = OpenMoeForCausalLM(cfg).eval()
    a, b = [0, 5, 6, 7, 1], [0, 8, 9, 1]
    packed = torch.tensor([a + b])
    pos = torch.tensor([list(range(5)) + list(range(4))])
    out = m(packed, position_ids=pos, use_cache=False).logits
    assert torch.allclose(out[0, :5], m(torch.tensor([a])).logits[0], atol=1e-5)
    assert torch.allclose(out[0, 5:], m(torch.tensor([b])).logits[0], atol=1e-5)


@pytest.mark.parametrize("extra,msg", [
    (["--lr", "abc"], "--lr 'abc': expected float"),
    (["--bogus", "1"], "unknown flag --bogus"),
    (["--optimizer", "sgd"], "optimizer='sgd'"),
    (["--freeze", "brains"], "--freeze 'brains'"),
    (["--data", "[]"], "data=[]"),
    (["--model", "/nonexistent/cfg"], "model /nonexistent/cfg"),
    (["--data", '[{"name": "x", "path": "/nonexistent.jsonl"}]'], "no such file"),
])
def test_cli_errors_are_one_line_and_exit_2(run_setup, extra, msg, capsys, monkeypatch):
    monkeypatch.setenv("OPENMOE_NO_TQDM", "1")
    sys.path.insert(0, str(ROOT))
    from openmoe.cli import train

    assert train.main(run_setup + extra) == 2  # in-process: the same main() the CLI runs
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1, err


def test_refuses_to_clobber_checkpoints_without_resume(run_setup):
    assert _run_cli(run_setup + ["--steps", "2"]).returncode == 0
    r = _run_cli(run_setup + ["--steps", "2"])
    assert r.returncode == 2 and "--resume" in r.stderr


def test_infer_runs_on_the_exported_folder(run_setup, capsys):
    cfg = load_config(None, run_setup + ["--steps", "2"])
    t = Trainer(cfg, log=lambda *a: None)
    t.setup()
    final = t.train()
    sys.path.insert(0, str(ROOT))
    from openmoe.cli import infer

    assert infer.main([str(final), "--prompt", "def f", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""
