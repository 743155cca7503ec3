import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_setup(tmp_path):
    """A tiny model config folder, a tokenizer and two local sources; returns CLI override args."""
    from openmoe import OpenMoeConfig
    from openmoe.demo import write_jsonl
    from openmoe.data import train_sentencepiece

    code = [f"def f{i}(x):\n    return x + {i}\n" for i in range(40)]
    prose = [f"The river number {i} runs to the sea, and the sea is wide." for i in range(40)]
    write_jsonl(tmp_path / "rp.jsonl", "text", prose)
    write_jsonl(tmp_path / "stack.jsonl", "content", code)
    spm = train_sentencepiece(code + prose, str(tmp_path / "spm"), 320)
    cfg = OpenMoeConfig(vocab_size=384, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=2, head_dim=16, num_experts=4, moe_layer_interval=2,
                        max_position_embeddings=64)
    cfg.save_pretrained(tmp_path / "model_cfg")
    data = [{"name": "rp", "path": str(tmp_path / "rp.jsonl"), "weight": 0.5},
            {"name": "stack", "path": str(tmp_path / "stack.jsonl"), "text_field": "content", "weight": 0.5}]
    return ["--model", str(tmp_path / "model_cfg"), "--tokenizer", spm, "--data", json.dumps(data),
            "--seq_len", "32", "--batch_size", "4", "--steps", "6", "--lr", "3e-3", "--warmup_steps", "2",
            "--log_every", "1", "--save_every", "2", "--precision", "fp32", "--tensorboard", "false",
            "--peak_tflops", "1.0", "--out_dir", str(tmp_path / "run")]
