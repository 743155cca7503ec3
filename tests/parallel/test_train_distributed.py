"""train.py under torchrun with ep=2 on gloo: the same losses as one process on the same global
batch, and one consolidated HF folder whose weights equal the single-process run's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _arg(args, key):
    return args[args.index(key) + 1]


def _metrics(out_dir):
    return [json.loads(l) for l in open(Path(out_dir) / "metrics.jsonl")]


def test_torchrun_ep2_matches_single_process(run_setup):
    common = run_setup + ["--steps", "4", "--model_overrides.capacity_policy", "dropless",
                          "--model_overrides.router_aux_loss_coef", "0"]
    out = _arg(run_setup, "--out_dir")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OPENMOE_NO_TQDM="1", OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, "--batch_size", "4",
                             "--out_dir", out + "_single"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert single.returncode == 0, single.stderr[-2000:]
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), *common, "--batch_size", "2", "--ep", "2",
                           "--out_dir", out + "_ep2"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert dist.returncode == 0, dist.stderr[-3000:]
    assert "world 2 = dp 1 x ep 2" in dist.stdout
    a, b = _metrics(out + "_single"), _metrics(out + "_ep2")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert rb["lm_loss"] == pytest.approx(ra["lm_loss"], rel=1e-5, abs=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
        assert rb["tokens_per_expert"] == ra["tokens_per_expert"]
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ma = AutoModelForCausalLM.from_pretrained(out + "_single/final")
    mb = AutoModelForCausalLM.from_pretrained(out + "_ep2/final")  # consolidated from 2 expert shards
    for (n, pa), (_, pb) in zip(ma.named_parameters(), mb.named_parameters()):
        assert pa.shape == pb.shape and torch.allclose(pa, pb, atol=1e-5), n
    ck = Path(out + "_ep2") / "checkpoints" / "step_00000004"
    assert (ck / "rank00000" / "model.safetensors").exists() and (ck / "rank00001" / "optimizer.pt").exists()
    w0 = load_file(ck / "rank00000" / "model.safetensors")
    assert w0["model.layers.1.mlp.experts.wi_gate"].shape[0] == 2  # each rank saved its half
