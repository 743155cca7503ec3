"""infer.py and openmoe/generation: greedy == hand loop, batch == one by one, chat format, stops."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openmoe import OpenMoeForCausalLM
from helpers import bpe_tokenizer, build_corpus
from openmoe.generation import CHAT_TEMPLATE, clean_output, encode_prompts, ensure_chat_template

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from openmoe.cli import infer  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers import tiny_config

    d = tmp_path_factory.mktemp("infer")
    build_corpus(d / "c.jsonl", n_docs=60)
    with open(d / "c.jsonl", "a") as f:  # make '<', '/', '>' pieces exist, to spell </s> as text
        f.write(json.dumps({"text": "a < b / c > d"}) + "\n")
    tok = bpe_tokenizer(d / "c.jsonl", 120)
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=len(tok), capacity_policy="dropless")
    m = OpenMoeForCausalLM(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" not in n:
                p.normal_(0, 0.3)
    m.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    return d / "model"


def _args(model_dir, *extra):
    return infer.parse_args([str(model_dir), *extra])


def test_greedy_equals_hand_loop(model_dir):
    args = _args(model_dir, "--prompt", "the cat sees", "--max-new-tokens", "6")
    model, tok = infer.load(args)
    outs, _ = infer.generate(args, model, tok, ["the cat sees"])
    ids = encode_prompts(tok, ["the cat sees"])["input_ids"]
    assert ids[0, 0] == 0 and (ids[0, 1:] != 0).all()  # BOS id 0 first, no tokenizer specials
    for _ in range(6):  # plain argmax loop over full forwards, no cache
        nxt = model(ids).logits[0, -1].argmax()
        if nxt == model.config.eos_token_id:
            break
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    n_prompt = encode_prompts(tok, ["the cat sees"])["input_ids"].shape[1]
    expected = clean_output(tok.decode(ids[0, n_prompt:], skip_special_tokens=True))
    assert outs[0] == expected


def test_batch_file_equals_one_by_one(model_dir, tmp_path):
    prompts = ["the cat", "a small bird finds the", "my sister paints"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    assert infer.main([str(model_dir), "--input", str(tmp_path / "p.jsonl"), "--output",
                       str(tmp_path / "o.jsonl"), "--max-new-tokens", "5"]) == 0
    batch = [json.loads(l)["output"] for l in open(tmp_path / "o.jsonl")]
    args = _args(model_dir, "--max-new-tokens", "5")
    model, tok = infer.load(args)
    single = [infer.generate(args, model, tok, [p])[0][0] for p in prompts]
    assert batch == single


def test_streaming_equals_non_streaming(model_dir):
    args = _args(model_dir, "--max-new-tokens", "8")
    model, tok = infer.load(args)
    plain, _ = infer.generate(args, model, tok, ["the robot"])
    buf = io.StringIO()
    streamed, _ = infer.generate(args, model, tok, ["the robot"], stream_to=buf)
    assert streamed == plain
    assert buf.getvalue().strip() == plain[0]


def test_chat_template_string_exact(model_dir):
    args = _args(model_dir, "--chat", "--system", "Be brief.")
    _, tok = infer.load(args)
    assert infer.render(args, tok, prompt="Hi there") == \
        "<<SYS>>\nBe brief.\n<</SYS>>\n\n<s>[INST] Hi there [/INST]"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]
    ensure_chat_template(tok)
    assert tok.apply_chat_template(msgs, tokenize=False) == "<s>[INST] a [/INST] b</s><s>[INST] c [/INST]"
    assert tok.chat_template == CHAT_TEMPLATE


def test_stop_text_is_cut_and_passed_to_generate(model_dir):
    assert clean_output(" hello there</s> more text") == "hello there"
    args = _args(model_dir)
    model, tok = infer.load(args)
    kw = infer.generation_kwargs(args, model, tok)
    assert kw["stop_strings"] == ["</s>"] and kw["eos_token_id"] == 1


def test_generation_stops_on_stop_text(model_dir):
    # Force a model that always continues with the pieces of "</s>" spelled as text.
    args = _args(model_dir, "--max-new-tokens", "12")
    model, tok = infer.load(args)
    # umT5's chat model spells it as the pieces '</', 's', '>'; here: '<', '/', 's', '>'
    stop_ids = [tok.convert_tokens_to_ids(c) for c in "</s>"]
    assert tok.unk_token_id not in stop_ids and tok.eos_token_id not in stop_ids
    state = {"i": 0}
    real_forward = model.forward

    def forward(*a, **k):
        out = real_forward(*a, **k)
        logits = torch.full_like(out.logits, -1e9)
        i = state["i"]
        tgt = stop_ids[(i - 2) % 4] if i >= 2 else tok.convert_tokens_to_ids("▁the")
        logits[:, -1, tgt] = 0
        state["i"] += 1
        out.logits = logits
        return out

    model.forward = forward
    outs, _ = infer.generate(args, model, tok, ["x"])
    assert state["i"] == 6  # 2 words + the 4 pieces of "</s>", not max_new_tokens
    assert outs[0] == "the the"


def test_cli_errors(tmp_path, model_dir):
    r = subprocess.run([sys.executable, str(ROOT / "infer.py"), str(tmp_path / "missing"), "--prompt", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such folder" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "infer.py"), str(model_dir), "--prompt", "x", "--dtype",
                        "float16"], capture_output=True, text=True)
    assert r.returncode == 2 and "fp16" in r.stderr
    args = _args(model_dir, "--max-new-tokens", "60")
    model, tok = infer.load(args)
    with pytest.raises(ValueError, match="positions"):
        infer.generate(args, model, tok, ["the cat " * 20])
    nontok = tmp_path / "notok"
    model.save_pretrained(nontok)
    with pytest.raises(ValueError, match="tokenizer"):
        infer.load(_args(nontok))
    assert infer.main([str(nontok), "--prompt", "x"]) == 2  # one line, exit 2, as every bad input


def test_infer_on_train_py_export_and_colossalai_folder(tmp_path, model_dir):
    """infer.py works on a train.py export (weights + spm-based tokenizer) and on a published
    ColossalAI-layout folder (model_type llama, sharded .bin)."""
    import shutil

    from test_colossalai_layout import _colossalai_config

    m = OpenMoeForCausalLM.from_pretrained(model_dir)
    col = tmp_path / "colossal"
    col.mkdir()
    torch.save(m.state_dict(), col / "pytorch_model.bin")
    (col / "config.json").write_text(json.dumps(_colossalai_config(m.config)))
    for f in Path(model_dir).iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, col / f.name)
    a = _args(col, "--max-new-tokens", "5")
    model, tok = infer.load(a)
    assert model.config.eos_token_id == 1 and model.config.model_type == "openmoe"
    b = _args(model_dir, "--max-new-tokens", "5")
    ref_model, ref_tok = infer.load(b)
    assert infer.generate(a, model, tok, ["the cat"])[0] == infer.generate(b, ref_model, ref_tok, ["the cat"])[0]


def test_batches_of_input_equal_one_by_one_and_leave_no_partial(model_dir, tmp_path, capsys):
    prompts = ["the cat", "a small bird finds the", "my sister paints", "the robot"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "o.jsonl"
    assert infer.main([str(model_dir), "--input", str(tmp_path / "p.jsonl"), "--output", str(out),
                       "--max-new-tokens", "4", "--batch-size", "3", "--stats"]) == 0
    assert "decode_tokens_per_s" in capsys.readouterr().err
    got = [json.loads(l)["output"] for l in open(out)]
    args = _args(model_dir, "--max-new-tokens", "4")
    model, tok = infer.load(args)
    assert got == [infer.generate(args, model, tok, [p])[0][0] for p in prompts]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["o.jsonl", "p.jsonl"]  # no temporary left


def test_compile_flag_uses_a_static_cache_and_a_fullgraph_step(model_dir, monkeypatch, capsys):
    args = _args(model_dir, "--compile", "--max-new-tokens", "4", "--prompt", "the cat")
    model, tok = infer.load(args)
    kw = infer.generation_kwargs(args, model, tok)
    assert kw["cache_implementation"] == "static" and kw["compile_config"].fullgraph is True
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **k: compiled.append(k) or fn)  # the path, not inductor
    assert infer.main([str(model_dir), "--compile", "--max-new-tokens", "4", "--prompt", "the cat"]) == 0
    out, err = capsys.readouterr()
    assert "compile warm-up" in err and compiled and compiled[0]["fullgraph"] is True
    eager = infer.generate(_args(model_dir, "--max-new-tokens", "4"), model, tok, ["the cat"])[0][0]
    assert out.strip() == eager


# -- bad input: one line naming the flag, line or file, exit 2, before any generation ---------------

def _fails(capsys, *argv, match):
    rc = infer.main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert match in err and "Traceback" not in err, err
    return err


def _exit2(capsys, *argv, match):
    with pytest.raises(SystemExit) as e:  # argparse's ap.error
        infer.main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and "Traceback" not in err, err


def test_bad_flags_and_outputs_are_refused_before_loading(model_dir, tmp_path, capsys):
    _exit2(capsys, model_dir, "--prompt", "x", "--num-beams", "0", match="--num-beams 0: must be >= 1")
    _exit2(capsys, model_dir, "--prompt", "x", "--do-sample", "--top-p", "2.0", match="--top-p 2.0: must be in (0, 1]")
    (tmp_path / "p.jsonl").write_text('{"prompt": "the cat"}\n')
    _exit2(capsys, model_dir, "--input", tmp_path / "p.jsonl", "--output", tmp_path / "nodir" / "o.jsonl",
           match="--output")
    (tmp_path / "p.jsonl").write_text('{"prompt": "the cat"}\n\n{"prompt": 5}\n')
    err = _fails(capsys, model_dir, "--input", tmp_path / "p.jsonl", "--output", tmp_path / "o.jsonl",
                 match="line 3: 'prompt' is int")
    assert err.count("\n") == 1 and not (tmp_path / "o.jsonl").exists()
    (tmp_path / "p.jsonl").write_text('{"prompt": "the cat"}\n{"prompt": "a dog"\n')
    _fails(capsys, model_dir, "--input", tmp_path / "p.jsonl", match="line 2: not JSON")


def test_broken_config_and_damaged_weights_are_named(model_dir, tmp_path, capsys):
    import shutil

    from openmoe.utils.manifest import write_manifest

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / "config.json").write_text('{"vocab_size": 120,')
    err = _fails(capsys, d, "--prompt", "x", match=f"{d / 'config.json'}: not a valid config")
    assert "tokenizer" not in err
    shutil.copy(Path(model_dir) / "config.json", d / "config.json")
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated, no manifest
    _fails(capsys, d, "--prompt", "x", match=f"{weights}: cannot load the weights")
    shutil.copy(Path(model_dir) / "model.safetensors", weights)
    write_manifest(d)
    b = bytearray(weights.read_bytes())
    b[-10] ^= 0xFF  # a flipped byte in the data: loads silently without the manifest
    weights.write_bytes(bytes(b))
    _fails(capsys, d, "--prompt", "x", match=f"{weights}: sha256 does not match")
    assert infer.main([str(d), "--prompt", "x", "--max-new-tokens", "2", "--no-verify"]) == 0
