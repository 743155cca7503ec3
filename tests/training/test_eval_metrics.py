"""Issue 20: metrics you can trust (MFU and expert load by hand, one `loss`, one row per step
after a resume, missing loggers) and evaluation (eval loss by hand, train.py --eval_only)."""

import json
import math
from pathlib import Path

import pytest
import torch

from openmoe.training import Trainer, load_config
from openmoe.training.config import ConfigError
from helpers import arg, read_metrics

# make_run_setup's model: H 32, I 48, 2 heads x 16, E 4, top-2, V 384, 2 layers (MoE at layer 1),
# seq_len 32, batch 4, t5x capacity (cf 1.25): 4 groups of 32 tokens, 10 slots per expert each.
ATTN = 4 * 32 * 32 + 2 * 32  # q, k, v, o + two norms, every layer
MLP = 32 * 96 + 32 * 48 + 48 * 32  # OpenMoE's gate is 2I wide
EXPERTS = 2 * MLP  # k = 2 experts a token passes through
ACTIVE = 2 * ATTN + MLP + (4 * 32 + EXPERTS + MLP + 32) + 32 + 384 * 32  # + final norm, lm_head
FLOPS_PER_TOKEN = 6 * ACTIVE + 12 * 2 * 2 * 16 * 32


def _trainer(run_setup, *extra):
    t = Trainer(load_config(None, run_setup + list(extra)), log=lambda *a: None)
    t.setup()
    return t


def test_mfu_and_expert_load_by_hand(run_setup):
    t = _trainer(run_setup, "--steps", "3")
    assert t.flops_per_token == FLOPS_PER_TOKEN == 296832
    assert t.expert_flops_per_token == 6 * EXPERTS
    t.train()
    rows = [r for r in read_metrics(arg(run_setup, "--out_dir")) if "mfu" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        routed, kept = r["routed_per_expert"][0], r["tokens_per_expert"][0]
        assert sum(routed) == 4 * 32 * 2  # every token of the step routed to k = 2 experts
        assert all(k <= c for k, c in zip(kept, routed)) and sum(kept) <= 4 * 10 * 4  # 4 groups x E x 10
        assert r["drop_rate"][0] == pytest.approx(1 - sum(kept) / sum(routed), abs=1e-4)
        assert r["drop_rate"][0] >= 0.375 - 1e-4  # 160 slots for 256 assignments
        assert r["expert_load_max_over_mean"][0] == pytest.approx(max(routed) / (sum(routed) / 4), abs=1e-3)
        assert r["kept_load_max_over_mean"][0] == pytest.approx(max(kept) / (sum(kept) / 4), abs=1e-3)
        # MFU: tokens/s x the FLOPs really run (dropped assignments' expert FLOPs left out) / 1 TFLOP/s
        done = FLOPS_PER_TOKEN - 6 * EXPERTS * (1 - sum(kept) / sum(routed))
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * done / 1e12, rel=1e-6)


def test_one_loss_meaning_on_stdout_and_in_metrics(run_setup):
    lines = []
    t = Trainer(load_config(None, run_setup + ["--steps", "2"]), log=lines.append)
    t.setup()
    t.train()
    rows = [r for r in read_metrics(arg(run_setup, "--out_dir")) if "mfu" in r]
    for r in rows:
        # the total optimised loss: lm + output z + aux + router z, each with its coefficient
        assert r["loss"] > r["lm_loss"]
        line = next(x for x in lines if x.startswith(f"step {r['step']} |"))
        assert f"| loss {r['loss']:.4f} |" in line and f"| lm {r['lm_loss']:.4f} |" in line


def test_resume_rewrites_metrics_from_the_checkpoint_step(run_setup):
    t = _trainer(run_setup, "--steps", "4")
    t.train()
    t.close()
    out = Path(arg(run_setup, "--out_dir"))
    import shutil
    shutil.rmtree(out / "checkpoints" / "step_00000004")  # as if killed after step 4's row, before its save
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    t2 = Trainer(load_config(None, run_setup + ["--steps", "5"]), resume=True, log=lambda *a: None)
    t2.setup()
    assert t2.step == 2
    t2.train()
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]  # rows 3-4 of the lost steps rewritten


@pytest.mark.parametrize("flags, msg", [(["--tensorboard", "true"], "tensorboard=true: the tensorboard package"),
                                        (["--wandb", "myproj"], "wandb='myproj': the wandb package")])
def test_missing_logger_backend_is_a_config_error(run_setup, flags, msg, monkeypatch, capsys):
    from openmoe.cli import train as cli
    from openmoe.training import metrics

    monkeypatch.setattr(metrics, "installed", lambda name: False)
    monkeypatch.setenv("OPENMOE_NO_TQDM", "1")
    assert cli.main(run_setup + flags) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1
    assert not (Path(arg(run_setup, "--out_dir")) / "metrics.jsonl").exists()


def test_peak_measured_again_when_a_window_beats_it(run_setup, monkeypatch):
    from openmoe.training import trainer as tr

    t = _trainer(run_setup, "--steps", "1")
    t.close()
    t.cfg.peak_tflops, t.peak_flops = None, 1e9
    monkeypatch.setattr(tr, "measured_peak", lambda dtype, device: 5.0)  # GFLOP/s
    t._check_peak(2e9)
    assert t.peak_flops == 5e9
    t._check_peak(4e9)  # below the peak: not measured again
    assert t.peak_flops == 5e9


def _eval_data(run_setup):
    rp = json.loads(arg(run_setup, "--data"))[0]
    return json.dumps([{**rp, "name": "heldout"}])


def _hand_loss(model, batch) -> float:
    """Masked mean next-token cross-entropy from the model's logits, with torch alone."""
    with torch.no_grad():
        # use_cache=False as in training: with a cache, packed position ids give other logits
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits.float()
    V = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), batch["labels"][:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="mean").item()


def test_eval_loss_equals_a_hand_computation(run_setup):
    t = _trainer(run_setup, "--eval_data", _eval_data(run_setup), "--eval_batches", "2", "--batch_size", "2")
    t.close()
    res = t.evaluate()
    assert t.model.training  # back to training mode
    batches = t._eval_batches()["heldout"]
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (2, 32)
    t.model.eval()
    total = count = 0.0
    for b in batches:
        n = int((b["labels"][:, 1:] != -100).sum())
        total += _hand_loss(t.model, b) * n
        count += n
    assert res["eval/heldout/loss"] == pytest.approx(total / count, rel=1e-5)
    assert res["eval/heldout/ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_eval_every_logs_and_eval_only_on_an_exported_folder(run_setup, capsys, monkeypatch):
    from openmoe.cli import train as cli

    monkeypatch.setenv("OPENMOE_NO_TQDM", "1")
    ev = _eval_data(run_setup)
    assert cli.main(run_setup + ["--steps", "2", "--eval_every", "2", "--eval_data", ev, "--eval_batches", "1"]) == 0
    out = Path(arg(run_setup, "--out_dir"))
    rows = [r for r in read_metrics(out) if "eval/heldout/loss" in r]
    assert [r["step"] for r in rows] == [2] and "eval/heldout/ppl" in rows[0]
    capsys.readouterr()
    code = cli.main(["--init_from", str(out / "final"), "--eval_data", ev, "--eval_batches", "1", "--seq_len", "32",
                     "--batch_size", "4", "--precision", "fp32", "--out_dir", str(out.parent / "ev"), "--eval_only"])
    assert code == 0
    stdout = capsys.readouterr().out
    (row,) = read_metrics(out.parent / "ev")
    assert row["step"] == 0
    # the same weights and rows as the run's last evaluation
    assert row["eval/heldout/loss"] == pytest.approx(rows[0]["eval/heldout/loss"], rel=1e-5)
    assert f"eval step 0 | heldout loss {row['eval/heldout/loss']:.4f}" in stdout
    assert not (out.parent / "ev" / "final").exists()
