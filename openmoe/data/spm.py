"""A sentencepiece model as an HF fast tokenizer that gives sentencepiece's own ids.

OpenMoE was trained on ids from `seqio.SentencePieceVocabulary` over the umT5 model
(`umt5.256000/sentencepiece.model`, 300 extra ids), which calls sentencepiece's `encode` on the
raw text; the sequence then starts with id 0 (pad doubles as BOS) and documents end with eos 1.
So the reference for every tokenizer we write is `SentencePieceProcessor.encode(text)`.

Why not transformers' T5Tokenizer / SpmConverter: it splits on whitespace before the unigram
model (sentencepiece does not), approximates the whitespace rules, lets the text `</s>` become
eos and appends eos to every input. Here the normalizer follows the model's own
`normalizer_spec` field by field and no pre-tokenizer splits the text, so the unigram lattice
sees the same string sentencepiece's does.

Pieces sentencepiece never matches in text (control, unknown, unused, byte) keep their names,
so eos/pad lookups and byte fallback work, but get a score no path through text would take
unless the text's characters have no pieces at all: the unigram model prices an unknown character
below its lowest piece, so `</s>` in text spells as text only where `<`, `/`, `s`, `>` are pieces.
umT5 has a piece for every printable ASCII character; a model that lacks one is warned about.
"""

from __future__ import annotations

from pathlib import Path

# Below every real piece (log-probabilities are > -100 in practice), so a literal `</s>` or
# `<0x0A>` in text is spelled with ordinary pieces, as sentencepiece does.
_NEVER = -1e6
_BOS_ID = 0  # OpenMoE: every sequence starts with id 0


def _proto(model):
    """ModelProto of a sentencepiece model given as a path or a SentencePieceProcessor."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    if isinstance(model, (str, Path)):
        proto.ParseFromString(Path(model).read_bytes())
    else:
        proto.ParseFromString(model.serialized_model_proto())
    return proto


def _normalizer(spec):
    """sentencepiece's normalisation as HF normalizers, in sentencepiece's order: the character
    map, then whitespace (only U+0020 counts, after the map), then the dummy prefix, then
    spaces spelled as `▁`."""
    from tokenizers import Regex, normalizers

    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    return normalizers.Sequence(steps)


def _decoder(spec):
    from tokenizers import decoders

    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    return decoders.Sequence(steps)


def _warn_unspellable(proto) -> None:
    """Warn where a never-matched piece's name could be read from text as that piece (above)."""
    import warnings

    chars = {p.piece for p in proto.pieces if p.type == proto.SentencePiece.NORMAL and len(p.piece) == 1}
    hidden = (proto.SentencePiece.CONTROL, proto.SentencePiece.UNKNOWN, proto.SentencePiece.UNUSED)
    missing = sorted({c for p in proto.pieces if p.type in hidden for c in p.piece if c not in chars})
    if missing:
        warnings.warn(f"sentencepiece model has no piece for {''.join(missing)!r}: text spelling a "
                      f"special piece's name with them tokenises as that piece, not as sentencepiece "
                      f"spells it", stacklevel=3)


def fast_tokenizer(model, *, extra_ids: int = 0, chat_template: str | None = None,
                   model_max_length: int | None = None):
    """An HF `PreTrainedTokenizerFast` equal to the sentencepiece `model` (path or processor).

    - `tok(text)["input_ids"] == [0] + sp.encode(text)`: BOS 0 from the post-processor, no eos.
      With `split_special_tokens=True` that holds for any text; by default the texts `<pad>`,
      `</s>`, `<unk>` and `<extra_id_N>` are read as their special ids, as HF tokenizers do, so a
      chat template can write `{{ bos_token }}`.
    - `extra_ids` sentinels `<extra_id_0>` .. at the top of the vocabulary, `<extra_id_0>` last,
      as seqio and T5 number them.
    """
    from tokenizers import AddedToken, Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    proto = _proto(model)
    if proto.trainer_spec.model_type != proto.trainer_spec.UNIGRAM:
        raise ValueError(f"sentencepiece model type {proto.trainer_spec.model_type} is not unigram; "
                         f"only unigram models (OpenMoE's umT5) are supported")
    normal = (proto.SentencePiece.NORMAL, proto.SentencePiece.USER_DEFINED)
    vocab = [(p.piece, p.score if p.type in normal else _NEVER) for p in proto.pieces]
    vocab += [(f"<extra_id_{extra_ids - 1 - i}>", _NEVER) for i in range(extra_ids)]
    unk_id = next(i for i, p in enumerate(proto.pieces) if p.type == proto.SentencePiece.UNKNOWN)
    tok = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=proto.trainer_spec.byte_fallback))
    tok.normalizer = _normalizer(proto.normalizer_spec)
    tok.decoder = _decoder(proto.normalizer_spec)
    # User-defined pieces are matched whole before the lattice, as sentencepiece does.
    tok.add_tokens([AddedToken(p.piece, normalized=False) for p in proto.pieces
                    if p.type == proto.SentencePiece.USER_DEFINED])

    pieces = [p.piece for p in proto.pieces]
    _warn_unspellable(proto)
    bos = pieces[_BOS_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, _BOS_ID)])

    def piece(i):
        return pieces[i] if 0 <= i < len(pieces) else None

    specials = {k: piece(i) for k, i in (("pad_token", proto.trainer_spec.pad_id),
                                          ("eos_token", proto.trainer_spec.eos_id),
                                          ("unk_token", unk_id))}
    extra = [f"<extra_id_{i}>" for i in range(extra_ids)]
    kw = {k: v for k, v in specials.items() if v is not None}
    if model_max_length:
        kw["model_max_length"] = model_max_length
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, padding_side="left",
                                 extra_special_tokens=extra, clean_up_tokenization_spaces=False, **kw)
    if chat_template:
        hf.chat_template = chat_template
    return hf
