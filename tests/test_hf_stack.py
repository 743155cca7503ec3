"""Every folder we write works in plain transformers with no extra argument: pipeline (text and
chat), generate with and without a tokenizer, TextStreamer, apply_chat_template; and the ids
fed by each equal what infer.py feeds. One converted T5X checkpoint and one train.py export."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationMixin, TextStreamer, pipeline

from openmoe.generation import encode_prompts

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    import sentencepiece as spm
    from helpers import OBJECTS, SUBJECTS, VERBS
    from test_convert import _tiny_checkpoint, cli

    tmp = tmp_path_factory.mktemp("hfconv")
    ckpt, _ = _tiny_checkpoint(tmp / "c")
    # every letter and the chat format's punctuation are pieces, as in umT5 (HF's stop-string
    # matcher needs text it can spell); 80 pieces + 10 extra ids fit tiny_config's 97
    (tmp / "c.txt").write_text("\n".join(SUBJECTS + VERBS + OBJECTS + [
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789", "<s>[INST] x [/INST] y</s> <<SYS>>"]))
    spm.SentencePieceTrainer.train(input=str(tmp / "c.txt"), model_prefix=str(tmp / "m"), vocab_size=80,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, hard_vocab_limit=False)
    assert cli.main([str(ckpt), str(tmp / "out"), "--head-dim", "16", "--tokenizer", str(tmp / "m.model"),
                     "--tokenizer-extra-ids", "10", "--no-progress"]) == 0
    return tmp / "out"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from helpers import make_run_setup

    from openmoe.training.config import load_config
    from openmoe.training.trainer import Trainer

    t = Trainer(load_config(None, make_run_setup(tmp_path_factory.mktemp("hftrain")) + ["--steps", "2"]),
                log=lambda *a: None)
    t.setup()
    return t.train()


@pytest.fixture(params=["converted", "trained"])
def folder(request):
    return request.getfixturevalue(request.param)


def test_pipeline_needs_no_tokenizer_argument(folder):
    gen = pipeline("text-generation", model=str(folder))
    out = gen("the cat", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert out.startswith("the cat")
    chat = gen(MSGS, max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert chat[-1]["role"] == "assistant" and isinstance(chat[-1]["content"], str)


def test_tokenizer_and_chat_template_feed_what_infer_feeds(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    text = "def f(x):\n    return x"
    ids = tok(text)["input_ids"]
    assert ids[0] == 0 and tok.eos_token_id not in ids  # BOS 0 prepended, no eos appended
    assert ids == encode_prompts(tok, [text])["input_ids"][0].tolist()
    chat_ids = tok.apply_chat_template(MSGS, add_generation_prompt=True)["input_ids"]
    rendered = tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
    assert chat_ids[0] == 0 and chat_ids.count(0) == 1  # one BOS, written by the template
    assert chat_ids == encode_prompts(tok, [rendered])["input_ids"][0].tolist()


def test_generate_and_streamer_without_tokenizer(folder, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(["the cat"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, streamer=TextStreamer(tok))
    assert out.shape[1] == enc["input_ids"].shape[1] + 3 or out[0, -1] == model.config.eos_token_id
    assert capsys.readouterr().out.strip()  # the streamer printed the text
    bare = tmp_path / "bare"  # weights without a tokenizer: generate still works
    model.save_pretrained(bare)
    out = AutoModelForCausalLM.from_pretrained(bare).generate(enc["input_ids"], max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 1


def test_stop_string_only_where_a_tokenizer_is(folder, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(GenerationMixin, "generate", lambda self, *a, **kw: seen.update(kw))
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.generate(torch.tensor([[0, 5]]))  # the folder's own tokenizer is found
    assert seen["stop_strings"] == ["</s>"] and seen["tokenizer"] is not None
    seen.clear()
    model.save_pretrained(tmp_path / "bare")
    AutoModelForCausalLM.from_pretrained(tmp_path / "bare").generate(torch.tensor([[0, 5]]))
    assert "stop_strings" not in seen
