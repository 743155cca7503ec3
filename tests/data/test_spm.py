"""openmoe/data/spm.py: the fast tokenizer gives sentencepiece's own ids for any text.

sentencepiece's `encode` is the independent reference (OpenMoE's seqio pipeline called it on
raw text). Three models cover the normalizer fields that matter: identity with whitespace
pieces and byte fallback (what train_sentencepiece writes), sentencepiece's defaults
(nmt_nfkc, dummy prefix, extra whitespace removed: newlines become spaces) and nmt_nfkc_cf with
no dummy prefix and a user-defined symbol.
"""

import pytest
import sentencepiece as spm

from openmoe.data.spm import fast_tokenizer
from openmoe.data.tokenizer import train_sentencepiece

_CODE = ["def f(x):\n    return x * 2\n", "for i in range(10):\n\tprint(i)  # tab\n",
         "class A:\n    def g(self):\n        pass\n\n\n", "if a < b and c > d: path/to/file_0x1F"]
_PROSE = ["The quick brown fox jumps over the lazy dog.", "Ünïcödé café naïve — “quotes” 日本語のテキスト",
          "  leading and trailing spaces  ", "multiple    spaces   here",
          '<div class="a">x</div> <s>old</s> <b>bold</b>']
_TRAIN = (_CODE + _PROSE) * 20
# Held out: whitespace runs, newlines at the edges, characters never seen (byte fallback or unk),
# the special pieces' names spelled in text, full-width and combining forms, CRLF, empty text.
HELD_OUT = ["def h(y):\n        return [y,\n                y]\n", "\n\nx\n", "\t\tindented\ttabs  \n",
            "   ", "", "emoji 🦙🚀 and Ω≈ç√∫", "ＡＢＣ１２３ ﬁ e\u0301", "a\r\nb", "a</s>b <s>x</s>",
            "<pad> <unk> <0x0A>", "<tool>call<tool>", "naïve café 日本", "x  y   z    "]
_SPECIAL_TEXT = ("<pad>", "</s>", "<unk>")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    (d / "c.txt").write_text("\n".join(_TRAIN))
    common = dict(input=str(d / "c.txt"), vocab_size=400, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                  minloglevel=2, hard_vocab_limit=False)
    spm.SentencePieceTrainer.train(model_prefix=str(d / "nfkc"), **common)
    spm.SentencePieceTrainer.train(model_prefix=str(d / "cf"), byte_fallback=True, add_dummy_prefix=False,
                                   normalization_rule_name="nmt_nfkc_cf", user_defined_symbols=["<tool>"],
                                   **common)
    return {"identity": train_sentencepiece(_TRAIN, str(d / "ident"), 400),
            "nfkc": str(d / "nfkc.model"), "cf": str(d / "cf.model")}


@pytest.mark.parametrize("kind", ["identity", "nfkc", "cf"])
def test_ids_equal_sentencepiece_for_any_text(models, kind, tmp_path):
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=models[kind])
    tok = fast_tokenizer(models[kind])
    tok.save_pretrained(tmp_path)  # what a folder holds: normalizer and post-processor survive
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for t in _TRAIN[:len(_CODE) + len(_PROSE)] + HELD_OUT:
        want = [0] + sp.encode(t)  # BOS 0 first, no eos appended
        assert reloaded(t, split_special_tokens=True)["input_ids"] == want, (kind, t)
        if not any(s in t for s in _SPECIAL_TEXT):
            assert reloaded(t)["input_ids"] == want, (kind, t)
        if sp.unk_id() not in want:  # decode round-trips wherever sentencepiece's does
            assert reloaded.decode(want, skip_special_tokens=True) == sp.decode(want[1:]), (kind, t)


def test_identity_model_keeps_code_exactly(models):
    tok = fast_tokenizer(models["identity"])
    code = "def f(x):\n    if x:\n\treturn  x\n\n"
    ids = tok(code)["input_ids"]
    assert ids[0] == 0 and 1 not in ids
    assert tok.decode(ids, skip_special_tokens=True) == code


def test_specials_and_extra_ids(models):
    tok = fast_tokenizer(models["identity"], extra_ids=3)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 0, 1, 2)
    n = spm.SentencePieceProcessor(model_file=models["identity"]).get_piece_size()
    # seqio / T5 numbering: <extra_id_0> is the last id
    assert tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_2>"]) == [n + 2, n]
    assert len(tok) == n + 3
    # by default the specials' names read as their ids (HF convention, so templates can write them)
    assert tok("a</s>")["input_ids"][-1] == 1
    assert tok("<pad>x", add_special_tokens=False)["input_ids"][0] == 0


def test_bpe_model_is_refused(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(_TRAIN))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "b"),
                                   vocab_size=100, model_type="bpe", minloglevel=2, hard_vocab_limit=False)
    with pytest.raises(ValueError, match="only unigram"):
        fast_tokenizer(tmp_path / "b.model")
