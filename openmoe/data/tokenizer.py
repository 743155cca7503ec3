"""Tokenizers: any HF tokenizer folder/name, or a sentencepiece `.model` file (OpenMoE's umT5 spm).

Training encodes without the tokenizer's own specials: the packer adds BOS (0) and EOS (1)
itself, as OpenMoE did (umT5's tokenizer would append an eos, and has no BOS).
"""

from __future__ import annotations

import hashlib
import json
import os

from .spm import fast_tokenizer


class TextTokenizer:
    """encode(text) -> ids without specials; `hf` is an HF tokenizer to save with the model (for a
    `.model` file, the exact fast tokenizer of `spm.py`)."""

    def __init__(self, path: str):
        self.path = path
        if path.endswith(".model"):
            if not os.path.isfile(path):
                raise ValueError(f"tokenizer: no such sentencepiece model {path}")
            import sentencepiece as spm

            try:
                self.sp = spm.SentencePieceProcessor(model_file=path)
                self.hf = fast_tokenizer(self.sp)
            except (OSError, RuntimeError, ValueError) as e:  # a file that is not a usable model
                raise ValueError(f"tokenizer {path}: not a usable sentencepiece model "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        else:
            self.sp = None
            from transformers import AutoTokenizer

            try:
                self.hf = AutoTokenizer.from_pretrained(path)
            except Exception as e:  # noqa: BLE001 - named error for a bad --tokenizer
                raise ValueError(f"tokenizer {path!r} cannot be loaded: {type(e).__name__}: {e}") from None

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        if self.sp is not None:
            return self.sp.encode(text)
        # Text is text: a `</s>` inside a document is spelled, not read as eos (as sentencepiece does).
        return self.hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text in one call, on one thread (processes give the parallelism)."""
        if self.sp is not None:
            return self.sp.encode(list(texts), num_threads=1)
        return self.hf(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def fingerprint(self) -> str:
        """sha256 of what decides the ids: the sentencepiece model proto, or the fast tokenizer's
        serialised JSON (the vocabulary for a slow one). Pre-tokenized folders record it."""
        if getattr(self, "_fp", None) is None:
            if self.sp is not None:
                data = self.sp.serialized_model_proto()
            elif getattr(self.hf, "is_fast", False):
                data = self.hf.backend_tokenizer.to_str().encode()
            else:
                data = json.dumps(sorted(self.hf.get_vocab().items())).encode()
            self._fp = hashlib.sha256(data).hexdigest()
        return self._fp


def train_sentencepiece(texts, prefix: str, vocab_size: int) -> str:
    """Train a unigram sentencepiece model with OpenMoE's special ids: pad 0, eos 1, unk 2,
    no BOS piece (id 0 doubles as BOS). Returns the .model path."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_by_whitespace=True,
        allow_whitespace_only_pieces=True,  # indentation runs become single pieces
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", character_coverage=0.9995,
        # the special pieces' characters always have pieces, so `</s>` written in text spells as
        # text in the fast tokenizer too, as in sentencepiece (data/spm.py)
        required_chars="".join(sorted(set("<pad></s><unk>"))),
        byte_fallback=True, hard_vocab_limit=False, num_threads=2, minloglevel=2,
        max_sentence_length=16384, train_extremely_large_corpus=False)
    return prefix + ".model"
