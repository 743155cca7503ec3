"""lm-evaluation-harness on an exported folder, with the command of the README (a local YAML task
over a local jsonl: no download). Skipped where lm_eval is not installed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

TASK = """task: openmoe_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_harness_on_an_exported_folder(run_setup, tmp_path):
    from openmoe.training import Trainer, load_config

    cfg = load_config(None, run_setup + ["--steps", "1"])
    t = Trainer(cfg, log=lambda *a: None)
    t.setup()
    final = t.train()
    rows = [{"question": "The river number 3 runs to the", "choices": [" sea", " tree"], "answer": 0},
            {"question": "def f1(x):\n    return x +", "choices": [" 1", " river"], "answer": 0},
            {"question": "The river number 7 runs", "choices": [" to the sea", " def f"], "answer": 0}]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny.yaml").write_text(TASK.format(data=tasks / "tiny.jsonl"))
    exe = shutil.which("lm_eval", path=str(Path(sys.executable).parent)) or shutil.which("lm_eval")
    out = tmp_path / "results"
    r = subprocess.run([exe, "--model", "hf", "--model_args", f"pretrained={final},trust_remote_code=True,dtype=float32",
                        "--tasks", "openmoe_tiny_choice", "--include_path", str(tasks), "--device", "cpu",
                        "--batch_size", "2", "--output_path", str(out), "--log_samples"],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    (res_file,) = out.rglob("results_*.json")
    res = json.loads(res_file.read_text())
    acc = res["results"]["openmoe_tiny_choice"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and res["n-samples"]["openmoe_tiny_choice"]["effective"] == 3
    (samples,) = out.rglob("samples_openmoe_tiny_choice_*.jsonl")
    lls = [float(resp[0][0]) for s in map(json.loads, samples.read_text().splitlines()) for resp in s["resps"]]
    assert len(lls) == 6 and all(ll < 0 for ll in lls)  # a log-likelihood per choice, from the model
