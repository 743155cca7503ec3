"""lm-evaluation-harness on an exported folder, with the command of the README (a local YAML task
over a local jsonl: no download): its log-likelihoods equal the model's own, computed here from
the logits with the BOS first, as the model was trained. Skipped where lm_eval is not installed
(`make test-lm-eval` installs it in a venv of its own; the CI runs it)."""

import json
import os
import subprocess
import sys

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
    rows = [{"question": "The river number 3 runs to the", "choices": ["sea", "tree"], "answer": 0},
            {"question": "def f1(x):\n    return x +", "choices": ["1", "river"], "answer": 0},
            {"question": "The river number 7 runs", "choices": ["to the sea", "def f"], "answer": 0}]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny.yaml").write_text(TASK.format(data=tasks / "tiny.jsonl"))
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={final},trust_remote_code=True,dtype=float32",
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
    docs = sorted(map(json.loads, samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    lls = [[float(resp[0][0]) for resp in s["resps"]] for s in docs]
    # lm_eval joins context and choice with the task's target_delimiter, " " by default
    want = [[_loglikelihood(final, row["question"], " " + c) for c in row["choices"]] for row in rows]
    assert sum(lls, []) == pytest.approx(sum(want, []), rel=1e-4)  # batched with padding: ~2e-5


def _loglikelihood(folder, context: str, continuation: str) -> float:
    """log p(continuation | BOS + context): the continuation's tokens are those of the whole text
    after the context's (lm_eval's split), each scored by the logits of the position before it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    whole = tok(context + continuation)["input_ids"]
    n_ctx = len(tok(context)["input_ids"])
    assert whole[0] == 0 and whole[:n_ctx] == tok(context)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))
