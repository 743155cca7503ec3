"""TrainConfig: every field checked by type and range when loaded, model overrides validated
by OpenMoeConfig itself, unknown names refused with the closest one, seq_len vs positions."""

import sys
from pathlib import Path

import pytest

from openmoe.training import ConfigError, load_config
from openmoe.training.config import model_config

ROOT = Path(__file__).resolve().parents[2]
BASE = ["--model", "m", "--data", '[{"name": "a", "path": "a.jsonl"}]']


def test_yaml_numbers_in_any_notation_and_typed_fields(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 3e-3\nsteps: 1e3\npeak_tflops: 2E1\nfreeze: router\nbetas: [0.9, 0.99]\n")
    cfg = load_config(str(tmp_path / "c.yaml"), BASE)
    assert (cfg.lr, cfg.steps, cfg.peak_tflops, cfg.freeze, cfg.betas) == (3e-3, 1000, 20.0, ["router"], [0.9, 0.99])
    for yaml_text, msg in [("lr: [1]\n", "lr=[1]: expected float"), ("steps: true\n", "steps=True: expected int"),
                           ("lr: fast\n", "lr 'fast': expected float"), ("seq_lne: 8\n", "did you mean seq_len")]:
        (tmp_path / "c.yaml").write_text(yaml_text)
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            load_config(str(tmp_path / "c.yaml"), BASE)


@pytest.mark.parametrize("extra,msg", [
    (["--lr", "nan"], "lr=nan"), (["--steps", "1.5"], "--steps '1.5': expected int"),
    (["--betas", "[0.9]"], "betas=[0.9]"), (["--min_lr_ratio", "2"], "min_lr_ratio=2.0"),
    (["--data", "[1]"], "data=[1]"), (["--lora_dropout", "1"], "lora_dropout=1.0"),
    (["--model_overrides.num_expert", "8"], "--model_overrides.num_expert: not an OpenMoeConfig field; did you "
                                           "mean num_experts?"),
])
def test_bad_values_name_the_key(extra, msg):
    with pytest.raises(ConfigError) as e:
        load_config(None, BASE + extra)
    assert msg in str(e.value)


def test_overrides_go_through_the_model_config_validation(run_setup):
    for extra, msg in [(["--model_overrides.num_experts_per_tok", "9"], "num_experts_per_tok=9"),
                       (["--model_overrides.num_key_value_heads", "3"], "num_key_value_heads=3"),
                       (["--model_overrides.capacity_policy", "magic"], "unknown capacity policy"),
                       (["--seq_len", "128"], "seq_len=128: exceeds the model's max_position_embeddings=64")]:
        with pytest.raises(ConfigError, match=msg):
            model_config(load_config(None, run_setup + extra))
    mcfg = model_config(load_config(None, run_setup + ["--seq_len", "128",
                                                       "--model_overrides.max_position_embeddings", "128"]))
    assert mcfg.max_position_embeddings == 128


def test_cli_refuses_seq_len_beyond_positions_before_writing(run_setup, capsys, monkeypatch):
    monkeypatch.setenv("OPENMOE_NO_TQDM", "1")
    sys.path.insert(0, str(ROOT))
    from openmoe.cli import train

    assert train.main(run_setup + ["--seq_len", "128"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seq_len=128" in err and "max_position_embeddings=64" in err
    out = Path(run_setup[run_setup.index("--out_dir") + 1])
    assert not (out / "train_config.json").exists() and not (out / "final").exists()
    assert train.main(run_setup + ["--model_overrides.num_expert", "8"]) == 2
    assert "did you mean num_experts?" in capsys.readouterr().err
    assert not (out / "train_config.json").exists()


def test_help_lists_every_key_with_type_default_and_help(capsys):
    import dataclasses

    from openmoe.cli import train
    from openmoe.training.config import TrainConfig, key_help

    rows = key_help()
    assert [r[0] for r in rows] == [f.name for f in dataclasses.fields(TrainConfig)]
    assert all(h for _, _, _, h in rows), [k for k, _, _, h in rows if not h]  # a new field needs a comment
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    for key, typ, default, _ in rows:
        assert f"--{key} {typ.upper()}" in out and f"(default {default})" in out
