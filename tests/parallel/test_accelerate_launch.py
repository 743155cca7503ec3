"""train.py under `accelerate launch` (issue: usable under accelerate): accelerate's multi-process
launcher sets the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), which the trainer
reads; on a CPU-only machine the trainer then picks gloo. Same losses as torchrun would give is
covered by test_train_distributed; here: it starts, splits experts, trains and exports."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate CLI not installed")
def test_accelerate_launch_runs_expert_parallel_training(run_setup):
    out = run_setup[run_setup.index("--out_dir") + 1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OPENMOE_NO_TQDM="1", OMP_NUM_THREADS="1")
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(ROOT / "train.py"), *run_setup,
           "--steps", "2", "--save_every", "2", "--batch_size", "2", "--ep", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world 2 = dp 1 x ep 2" in res.stdout
    rows = [json.loads(l) for l in open(Path(out) / "metrics.jsonl") if "lm_loss" in l]
    assert [r["step"] for r in rows] == [1, 2]
    assert (Path(out) / "final" / "config.json").is_file()
