"""openmoe/planner: hand-checked parameter / LoRA / capacity numbers, `train.py --plan` on the 8B
config in seconds without its weights, a run whose plan does not fit stopped before loading,
the layout suggestion, and bad flags."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openmoe import OpenMoeConfig, OpenMoeForCausalLM
from openmoe.planner.activations import kept_assignments
from openmoe.planner.cli import suggest
from openmoe.planner.layout import Layout, candidate_layouts, parse_size
from openmoe.planner.memory import Workload, plan_memory

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from openmoe.cli import train  # noqa: E402

N_8B = 11_855_046_656  # README / reference: parameters of OpenMoE-8B from the tensor shapes


def _rows(plan):
    return {label: b for label, b, _ in plan.rows}


def test_8b_full_finetuning_states_by_hand():
    cfg = OpenMoeConfig.from_pretrained(ROOT / "configs/8b")
    p = plan_memory(cfg, Workload(batch=1, seq=2048, compute="bf16"))
    r = _rows(p)
    assert p.params_total == N_8B
    assert r["parameters"] == 4 * N_8B and r["gradients"] == 4 * N_8B and r["optimizer state"] == 8 * N_8B
    assert 16 * N_8B / 1e9 == pytest.approx(189.7, abs=0.1)  # the "~190 GB"
    # EP 8 keeps 32 / 8 experts per rank; FSDP2 over 8 ranks shards everything else
    experts = 4 * 32 * (2048 * 16384 + 2048 * 8192 + 8192 * 2048)
    p8 = plan_memory(cfg, Workload(batch=1, seq=2048, compute="bf16"), Layout(8, ep=8, fsdp=8))
    assert _rows(p8)["parameters"] == pytest.approx(4 * (experts / 8 + (N_8B - experts) / 8))
    # EP 2 x dp 4 with FSDP2: experts split 2 ways by EP and 4 ways over their dp replicas (EZ-MoE)
    # = 8 ways, as the trainer does by default; without it only the EP split
    p2 = plan_memory(cfg, Workload(batch=1, seq=2048, compute="bf16"), Layout(8, ep=2, fsdp=8))
    assert _rows(p2)["parameters"] == pytest.approx(4 * (experts / 8 + (N_8B - experts) / 8))
    p2r = plan_memory(cfg, Workload(batch=1, seq=2048, compute="bf16"), Layout(8, ep=2, fsdp=8, fsdp_experts=False))
    assert _rows(p2r)["parameters"] == pytest.approx(4 * (experts / 2 + (N_8B - experts) / 8))
    assert "experts also over dp 4" in str(Layout(8, ep=2, fsdp=8))


def test_8b_lora_parameter_count_by_hand():
    cfg = OpenMoeConfig.from_pretrained(ROOT / "configs/8b")
    r = 8
    attention = 24 * 4 * r * (2048 + 3072)  # q, k, v: 2048 -> 3072; o: 3072 -> 2048
    mlp = r * ((2048 + 16384) + (2048 + 8192) + (8192 + 2048))  # gate 2I, up I, down
    experts = 4 * 32 * r * ((2048 + 16384) + (2048 + 8192) + (8192 + 2048))  # r E (in + out) per stack
    want = attention + 20 * mlp + 4 * mlp + experts
    p = plan_memory(cfg, Workload(batch=1, seq=2048, peft="lora", lora_rank=r))
    assert p.trainable == want == 51_249_152
    assert _rows(p)["parameters"] == 2 * N_8B  # bf16 base
    assert _rows(p)[f"LoRA adapter (r={r}, fp32)"] == 4 * want


def test_kept_assignments_by_hand():
    cfg = OpenMoeConfig(num_experts=4, num_experts_per_tok=2, capacity_factor_train=1.25, min_capacity=4,
                        router_group_size=4096)
    # t5x: 48 tokens -> 4 groups of 12, capacity max(round(1.25 * 12 / 4), 4) = 4 -> 4 * 4 * 4 slots
    assert kept_assignments(cfg, 48) == 64
    cfg.capacity_policy = "dropless"
    assert kept_assignments(cfg, 48) == 96
    cfg.capacity_policy = "colossalai"  # floor(2 * 1.25 * 48 / 4) = 30 per expert: no drop of 96
    assert kept_assignments(cfg, 48) == 96


def test_plan_of_8b_runs_in_seconds_without_allocating_its_weights():
    code = ("import re, sys, time, pathlib; sys.path.insert(0, '.');"
            "st=lambda k: int(re.search(k + r':\\s+(\\d+)', pathlib.Path('/proc/self/status').read_text()).group(1));"
            "from openmoe.cli import train; import openmoe.planner.cli; base = st('VmRSS'); t = time.time();"
            "rc = train.main(['--model', 'configs/8b', '--plan', '--peft', 'lora', '--quantize', '4bit',"
            " '--seq_len', '2048', '--batch_size', '1', '--precision', 'bf16', '--device', 'cuda',"
            " '--activation_checkpointing', 'true', '--device_memory', '24GB']);"
            "print('RESULT', rc, time.time() - t, (st('VmHWM') - base) * 1024)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    rc, seconds, grown = r.stdout.strip().splitlines()[-1].split()[1:]
    assert rc == "0" and float(seconds) < 20
    assert float(grown) < 300e6  # the 4-bit weights alone would be 7 GB, bf16 ones 24 GB
    assert "| **peak** |" in r.stdout and "device memory" in r.stdout and "fits" in r.stdout
    assert "dequantized expert stack (QLoRA)" in r.stdout and "load-time peak (QLoRA)" in r.stdout


def test_run_whose_plan_does_not_fit_stops_before_loading(run_setup, capsys, monkeypatch):
    monkeypatch.setenv("OPENMOE_NO_TQDM", "1")
    real_init = OpenMoeForCausalLM.__init__

    def meta_only(self, *a, **k):
        if torch.empty(()).device.type != "meta":
            raise AssertionError("a model was built before the plan was checked")
        real_init(self, *a, **k)

    monkeypatch.setattr(OpenMoeForCausalLM, "__init__", meta_only)
    assert train.main(run_setup + ["--device_memory", "1MiB"]) == 2
    err = capsys.readouterr().err
    assert "does not fit --device_memory 1MiB; stopped before loading" in err
    assert "| **peak** |" in err and "does NOT fit" in err and "activations: attention (x2)" in err
    out_dir = Path(run_setup[run_setup.index("--out_dir") + 1])
    assert not (out_dir / "checkpoints").exists()


def test_plan_flag_prints_and_exits_0_and_a_fitting_run_trains(run_setup, capsys):
    assert train.main(run_setup + ["--plan", "--device_memory", "8GB"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "NOT" not in out
    assert train.main(run_setup + ["--plan", "true", "--peft", "lora"]) == 0  # also as --plan true
    assert "LoRA r=8" in capsys.readouterr().out
    assert train.main(run_setup + ["--steps", "1", "--device_memory", "8GB", "--export_final", "false"]) == 0


def test_suggestion_is_the_smallest_layout_that_fits():
    cfg = OpenMoeConfig.from_pretrained(ROOT / "configs/8b")
    w = Workload(batch=1, seq=2048, compute="bf16", checkpointing=True)
    budget = parse_size("80GB")
    assert not plan_memory(cfg, w).fits(budget)
    wk, p = suggest(cfg, w, budget)
    assert p.fits(budget) and p.layout.world > 1
    smaller = [lay for lay in candidate_layouts(cfg.num_experts, max_world=p.layout.world // 2)]
    assert smaller and not any(plan_memory(cfg, w, lay).fits(budget) for lay in smaller)


@pytest.mark.parametrize("extra,msg", [
    (["--plan", "--world", "3", "--ep", "2"], "world=3: must be a multiple of ep=2"),
    (["--plan", "--world", "8", "--fsdp", "3"], "fsdp=3: must divide world=8"),
    (["--device_memory", "lots"], "device_memory='lots'"),
    (["--world", "8"], "--world is for --plan"),
])
def test_bad_planner_flags(run_setup, extra, msg, capsys):
    assert train.main(run_setup + extra) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1, err


def test_sizes():
    assert parse_size("80GB") == 80 * 10 ** 9 and parse_size("24GiB") == 24 * 2 ** 30
    assert parse_size("1.5TB") == 1.5e12 and parse_size("512MiB") == 512 * 2 ** 20
    with pytest.raises(ValueError):
        parse_size("80 parsecs")
    assert json.dumps(str(Layout(8, ep=8, fsdp=8))) == '"world 8 = dp 1 x ep 8, FSDP2 over all 8 ranks"'
