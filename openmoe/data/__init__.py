"""Data: sources (hub or local, text or pre-tokenized), mixture, tokenizer, packing, chat format."""

from .chat import chat_document, segments
from .mixture import PackedMixture
from .packing import IGNORE, Document, Packer
from .sources import DataError, DocumentStream, SourceConfig
from .tokenizer import TextTokenizer, train_sentencepiece
from .tokens import TokenStream, TokenWriter

__all__ = ["chat_document", "segments", "PackedMixture", "IGNORE", "Document", "Packer", "DataError",
           "DocumentStream", "SourceConfig", "TextTokenizer", "TokenStream", "TokenWriter",
           "train_sentencepiece"]
