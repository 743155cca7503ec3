"""Data: sources (hub or local), mixture, tokenizer, packing, chat format."""

from .chat import chat_document, segments
from .mixture import PackedMixture
from .packing import IGNORE, Document, Packer
from .sources import DataError, DocumentStream, SourceConfig
from .tokenizer import TextTokenizer, train_sentencepiece

__all__ = ["chat_document", "segments", "PackedMixture", "IGNORE", "Document", "Packer", "DataError",
           "DocumentStream", "SourceConfig", "TextTokenizer", "train_sentencepiece"]
