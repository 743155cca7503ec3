"""Packing tokenised documents into fixed-length training sequences.

Each document is [BOS=0] + tokens + [EOS=1]. Documents are concatenated and cut into rows of
`seq_len`. Per row we emit:
  input_ids     [S]  the tokens
  labels        [S]  the tokens, -100 where no loss is taken (the model shifts internally), so:
                     -100 at every BOS (nothing before it in its document predicts it) and at
                     tokens a document marks as not trained on (chat prompts)
  position_ids  [S]  0 at each BOS, counting up within the document. A document continued from
                     the previous row restarts at 0 without a BOS. HF's mask builder reads these
                     resets and makes the attention block-diagonal (sdpa/eager mask, flash-attn
                     varlen), so no token attends across a document boundary.
The packer is resumable: its whole state is the leftover token buffer (`state()` / `load_state`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE = -100


@dataclass
class Document:
    ids: list[int]  # without BOS/EOS
    train_mask: list[bool] | None = None  # per token: take loss on it (None: all)


@dataclass
class Packer:
    seq_len: int
    bos_id: int = 0
    eos_id: int = 1
    add_eos: bool = True
    _ids: list[int] = field(default_factory=list)
    _labels: list[int] = field(default_factory=list)
    _pos: list[int] = field(default_factory=list)

    def add(self, doc: Document) -> None:
        ids = [self.bos_id] + list(doc.ids) + ([self.eos_id] if self.add_eos else [])
        mask = [False] + (list(doc.train_mask) if doc.train_mask is not None else [True] * len(doc.ids))
        if self.add_eos:
            mask.append(mask[-1])  # eos is trained when the document's last token is
        self._ids += ids
        self._labels += [t if m else IGNORE for t, m in zip(ids, mask)]
        self._pos += list(range(len(ids)))

    def ready(self) -> bool:
        return len(self._ids) >= self.seq_len

    def pop(self) -> dict[str, torch.Tensor]:
        S = self.seq_len
        ids, labels, pos = self._ids[:S], self._labels[:S], self._pos[:S]
        self._ids, self._labels, self._pos = self._ids[S:], self._labels[S:], self._pos[S:]
        # A document cut here continues in the next row: restart its positions at 0 there.
        if self._pos and self._pos[0] != 0:
            n = next((i for i, p in enumerate(self._pos) if p == 0), len(self._pos))
            self._pos[:n] = list(range(n))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "position_ids": torch.tensor(pos)}

    def state(self) -> dict:
        return {"ids": list(self._ids), "labels": list(self._labels), "pos": list(self._pos)}

    def load_state(self, s: dict) -> None:
        self._ids, self._labels, self._pos = list(s["ids"]), list(s["labels"]), list(s["pos"])
