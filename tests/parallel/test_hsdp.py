"""Hybrid sharding (HSDP, openmoe/parallel/fsdp.py): train.py under torchrun at 4 ranks with
--ep 2 --fsdp 2 on gloo (non-expert parameters sharded over groups of 2 consecutive ranks and
replicated over the 2 groups, experts split by EP and replicated over dp) gives the same losses,
gradient norms (each element counted once although every shard lives on 2 ranks) and final
weights as one process on the same global batch; its checkpoint resumes at the same layout and
continues the run exactly."""

import os
import shutil
from pathlib import Path

import pytest
from helpers import arg, assert_same_weights, read_metrics, run_train


def _metrics(out_dir):
    return [r for r in read_metrics(out_dir) if "lm_loss" in r]


def test_hsdp_ep2_fsdp2_matches_single_process_and_resumes(run_setup):
    out = arg(run_setup, "--out_dir")
    common = run_setup + ["--steps", "4", "--model_overrides.capacity_policy", "dropless",
                          "--model_overrides.router_aux_loss_coef", "0", "--model_overrides.num_experts", "6",
                          "--save_every", "2", "--keep_last", "5"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OPENMOE_NO_TQDM="1", OMP_NUM_THREADS="1")
    run_train(common + ["--batch_size", "4", "--out_dir", out + "_single"], env)
    hsdp = common + ["--batch_size", "1", "--ep", "2", "--fsdp", "2"]
    r = run_train(hsdp + ["--out_dir", out + "_hsdp"], env, nproc=4)
    assert "world 4 = dp 2 x ep 2" in r.stdout
    assert "hybrid sharding (HSDP): non-expert parameters sharded over groups of 2 consecutive ranks, " \
           "replicated over 2 groups" in r.stdout, r.stdout[-2000:]
    a, b = _metrics(out + "_single"), _metrics(out + "_hsdp")
    assert [x["step"] for x in a] == [x["step"] for x in b] and len(a) >= 2
    for ra, rb in zip(a, b):
        assert rb["lm_loss"] == pytest.approx(ra["lm_loss"], rel=1e-5, abs=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)  # not over-counted by the replicas
        assert rb["tokens_per_expert"] == ra["tokens_per_expert"]

    from transformers import AutoModelForCausalLM

    ma = AutoModelForCausalLM.from_pretrained(out + "_single/final")
    mb = AutoModelForCausalLM.from_pretrained(out + "_hsdp/final")
    assert_same_weights(ma, mb)

    import torch.distributed.checkpoint as dcp

    ck = Path(out + "_hsdp") / "checkpoints" / "step_00000002"
    meta = dcp.FileSystemReader(str(ck)).read_metadata().state_dict_metadata
    assert tuple(meta["model.model.layers.1.mlp.experts.wi_gate"].size)[0] == 6  # global [E, ...]
    assert tuple(meta["model.model.embed_tokens.weight"].size) == tuple(ma.model.embed_tokens.weight.shape)

    # resume from the step-2 checkpoint at the same layout: steps 3-4 as in the uninterrupted run
    (Path(out + "_resume") / "checkpoints").mkdir(parents=True)
    shutil.copytree(ck, Path(out + "_resume") / "checkpoints" / "step_00000002")
    r = run_train(hsdp + ["--out_dir", out + "_resume", "--resume", "--export_final", "false"], env, nproc=4)
    assert "resumed from" in r.stdout
    c = {x["step"]: x for x in _metrics(out + "_resume")}
    for rb in b:
        if rb["step"] > 2:
            assert c[rb["step"]]["lm_loss"] == pytest.approx(rb["lm_loss"], rel=1e-5)
            assert c[rb["step"]]["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
