"""A weighted mixture of sources, tokenised and packed into [batch, seq] training batches.

Deterministic from a seed, and resumable: `state()` holds the sampler's RNG state, each
source's position and the packer's leftover tokens, so a resumed run sees exactly the
sequences it would have seen.
"""

from __future__ import annotations

import random

import torch

from .chat import chat_document
from .packing import Document, Packer
from .sources import DataError, DocumentStream, SourceConfig, check_source
from .tokens import TokenStream
from .workers import TokenizingStream, can_fork


class PackedMixture:
    """`encode` tokenises text sources; pre-tokenized sources (format: tokens) are read as ids and
    checked against the tokenizer: `tokenizer` (or `encode`'s TextTokenizer) must have the
    fingerprint their index records."""

    def __init__(self, sources: list[SourceConfig], encode, seq_len: int, batch_size: int, seed: int = 0,
                 bos_id: int = 0, eos_id: int = 1, tokenizer=None):
        if not sources:
            raise ValueError("data: no sources configured")
        self.sources = sources
        for src in sources:
            check_source(src)  # fail at start-up, not at the first batch
        self.streams = [TokenStream(s) if s.is_tokens()
                        else TokenizingStream(s, encode) if s.workers > 0 and s.kind == "text" and can_fork()
                        else DocumentStream(s) for s in sources]
        tok = tokenizer if tokenizer is not None else getattr(encode, "__self__", None)
        for s in self.streams:
            if isinstance(s, TokenStream):
                s.check_tokenizer(tok)
        total = sum(s.weight for s in sources)
        self.weights = [s.weight / total for s in sources]
        self.encode = encode
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.packer = Packer(seq_len, bos_id, eos_id)
        self.docs_per_source = [0] * len(sources)

    def _document(self) -> Document:
        i = self.rng.choices(range(len(self.streams)), weights=self.weights)[0]
        ex = self.streams[i].next()
        self.docs_per_source[i] += 1
        if isinstance(self.streams[i], (TokenStream, TokenizingStream)):  # ids already
            return Document(ex.tolist())
        if self.sources[i].kind == "chat":
            return chat_document(ex, self.encode)
        return Document(self.encode(ex[self.sources[i].text_field]))

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = []
        while len(rows) < self.batch_size:
            while not self.packer.ready():
                self.packer.add(self._document())
            rows.append(self.packer.pop())
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def close(self) -> None:
        """Stop tokenizer worker processes (they are daemons: they also end with the process)."""
        for s in self.streams:
            if isinstance(s, TokenizingStream):
                s.close()

    def state(self) -> dict:
        st = self.rng.getstate()
        return {"rng": [st[0], list(st[1]), st[2]], "streams": [s.state() for s in self.streams],
                "packer": self.packer.state(), "docs_per_source": list(self.docs_per_source)}

    def load_state(self, s: dict) -> None:
        self.rng.setstate((s["rng"][0], tuple(s["rng"][1]), s["rng"][2]))
        for stream, st in zip(self.streams, s["streams"]):
            stream.load_state(st)
        self.packer.load_state(s["packer"])
        self.docs_per_source = list(s["docs_per_source"])
