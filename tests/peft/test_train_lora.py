"""train.py --peft lora end to end: adapter + base + merged exports, infer.py --adapter equals the
merged folder, resume, and bad combinations stopped with one clear line before any loading."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from openmoe.cli import infer  # noqa: E402
from openmoe.cli import train  # noqa: E402
from helpers import arg  # noqa: E402

LORA = ["--peft", "lora", "--lora_rank", "4", "--lora_alpha", "8", "--lr", "1e-2",
        "--lora_targets", "attention,mlp,extra_mlp,router,experts"]


def test_lora_run_exports_adapter_base_and_merged_and_infer_agrees(run_setup, monkeypatch):
    monkeypatch.setenv("OPENMOE_NO_TQDM", "1")
    out = Path(arg(run_setup, "--out_dir"))
    assert train.main(run_setup + LORA + ["--steps", "4", "--merge", "true"]) == 0
    assert {p.name for p in out.iterdir()} >= {"adapter", "base", "final", "checkpoints"}
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(out / "base")
    assert "mlp.experts.wi_gate" in cfg["target_parameters"] and "mlp.gate_weight" in cfg["target_parameters"]
    loss = [json.loads(line)["lm_loss"] for line in open(out / "metrics.jsonl")]
    assert loss[-1] < loss[0]

    prompts = ["def f", "The river number"]
    with_adapter = infer.parse_args([str(out / "base"), "--adapter", str(out / "adapter"), "--max-new-tokens", "6"])
    merged = infer.parse_args([str(out / "final"), "--max-new-tokens", "6"])
    ma, tok = infer.load(with_adapter)
    mm, _ = infer.load(merged)
    ids = torch.tensor([[0] + tok("def f(x):", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ma(input_ids=ids).logits, mm(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert infer.generate(with_adapter, ma, tok, prompts)[0] == infer.generate(merged, mm, tok, prompts)[0]
    base = infer.load(infer.parse_args([str(out / "base")]))[0]
    with torch.no_grad():  # the adapter changed something
        assert not torch.allclose(base(input_ids=ids).logits, ma(input_ids=ids).logits, atol=1e-4)

    # --resume continues the LoRA run from its checkpoint (same wrapped structure)
    assert train.main(run_setup + LORA + ["--steps", "6", "--resume"]) == 0
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")][-2:] == [5, 6]


@pytest.mark.parametrize("extra,msg", [
    (["--quantize", "4bit"], "--quantize 4bit: QLoRA needs a CUDA GPU"),
    (["--lora_rank", "0"], "lora_rank=0: must be a positive integer"),
    (["--lora_targets", "attention,brains"], "unknown target 'brains'"),
    (["--lora_targets", "experts", "--model_overrides.moe_layer_interval", "100"], "'experts' matches nothing"),
    (["--lora_dropout", "0.1", "--lora_targets", "experts"], "dropout does not work on the router and expert"),
    (["--peft", "qlora"], "peft='qlora': choose lora"),
])
def test_bad_combinations_stop_before_loading(run_setup, extra, msg, capsys, monkeypatch):
    from openmoe import OpenMoeForCausalLM

    real_init = OpenMoeForCausalLM.__init__

    def meta_only(self, *a, **k):  # the planner's meta-device model is allowed: it holds no weights
        if torch.empty(()).device.type != "meta":
            raise AssertionError("a model was built before the error")
        real_init(self, *a, **k)

    def no_loading(*a, **k):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(OpenMoeForCausalLM, "__init__", meta_only)
    monkeypatch.setattr(OpenMoeForCausalLM, "from_pretrained", no_loading)
    assert train.main(run_setup + ["--peft", "lora"] + extra) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("extra,msg", [
    (["--quantize", "8bit"], "quantize='8bit': quantized weights are frozen; QLoRA needs --peft lora"),
    (["--merge", "true"], "there is no adapter to merge without --peft lora"),
])
def test_flags_that_need_peft(run_setup, extra, msg, capsys):
    assert train.main(run_setup + extra) == 2
    assert msg in capsys.readouterr().err


def test_quantize_names_both_requirements_here():
    """This machine has neither CUDA nor bitsandbytes: the error says what is needed."""
    from openmoe.peft.quant import QuantizationUnavailable, check_quantization

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(QuantizationUnavailable, match="CUDA GPU") as e:
        check_quantization("4bit", "auto")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert "bitsandbytes package" in str(e.value)
