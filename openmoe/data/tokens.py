"""Pre-tokenized corpora: packed token shards on disk, read through numpy memmaps.

A folder written by `python -m openmoe.data.pretokenize` (or `TokenWriter`) holds
  index.json              {"format": "openmoe-tokens", "version": 1, "dtype": "uint16" | "uint32",
                           "vocab_size": V, "tokenizer": {"name": ..., "sha256": ...},
                           "source": {...}, "num_documents": D, "num_tokens": T,
                           "shards": [{"tokens": "shard-00000.tokens", "offsets": "shard-00000.offsets",
                                       "documents": d, "num_tokens": n}, ...]}
  shard-NNNNN.tokens      the documents' ids back to back, raw little-endian `dtype` (uint16 when the
                          vocabulary has at most 65536 ids, else uint32), without BOS/EOS: the packer adds
                          them, so a pre-tokenized source packs exactly as its text would
  shard-NNNNN.offsets     raw uint64 [d + 1]: document i of the shard is tokens[offsets[i]:offsets[i+1]]
The documents keep the source's order. A folder is written under a temporary name and renamed
into place when complete, so a reader never sees a partial one.

`TokenStream` reads one such folder as an endless, resumable stream of documents with the same
state as `sources.DocumentStream` ((epoch, documents consumed in this epoch)); resuming seeks to
the document directly instead of re-reading the epoch.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .errors import DataError

FORMAT = "openmoe-tokens"
INDEX = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def is_token_folder(path: str) -> bool:
    f = Path(path) / INDEX
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def read_index(path: str, name: str = "?") -> dict:
    f = Path(path) / INDEX
    if not f.is_file():
        raise DataError(f"data source {name!r}: {path} is not a pre-tokenized folder (no {INDEX}; "
                        f"build one with `python -m openmoe.data.pretokenize`)")
    try:
        index = json.loads(f.read_text())
    except ValueError as e:
        raise DataError(f"data source {name!r}: {f} is not valid JSON ({e})") from None
    if index.get("format") != FORMAT or index.get("version") != 1:
        raise DataError(f"data source {name!r}: {f} is not an {FORMAT} v1 index")
    for sh in index["shards"]:
        for key in ("tokens", "offsets"):
            if not (Path(path) / sh[key]).is_file():
                raise DataError(f"data source {name!r}: shard file {Path(path) / sh[key]} is missing")
    if index["num_documents"] == 0:
        raise DataError(f"data source {name!r}: {path} holds no documents")
    return index


class TokenWriter:
    """Appends documents (id arrays) to shards of about `shard_tokens` ids; `close()` writes the
    index and renames the temporary folder to `out` (atomic on one filesystem)."""

    def __init__(self, out: str, vocab_size: int, tokenizer: dict, source: dict | None = None,
                 shard_tokens: int = 1 << 28, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
        self.overwrite = overwrite
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.dtype = token_dtype(vocab_size)
        self.limit = np.iinfo(self.dtype).max
        self.index = {"format": FORMAT, "version": 1, "dtype": self.dtype.name, "vocab_size": int(vocab_size),
                      "tokenizer": tokenizer, "source": source or {}, "num_documents": 0, "num_tokens": 0,
                      "shards": []}
        self.shard_tokens = shard_tokens
        self._f = None

    def _new_shard(self) -> None:
        self._finish_shard()
        i = len(self.index["shards"])
        self._sh = {"tokens": f"shard-{i:05d}.tokens", "offsets": f"shard-{i:05d}.offsets",
                    "documents": 0, "num_tokens": 0}
        self._f = open(self.tmp / self._sh["tokens"], "wb")
        self._offsets = [0]

    def _finish_shard(self) -> None:
        if self._f is None:
            return
        self._f.close()
        np.asarray(self._offsets, dtype=np.uint64).tofile(self.tmp / self._sh["offsets"])
        self.index["shards"].append(self._sh)
        self._f = None

    def add(self, ids) -> None:
        a = np.asarray(ids)
        if a.size and (a.min() < 0 or a.max() > self.limit):
            raise ValueError(f"token id out of range for {self.dtype.name}: {a.min()}..{a.max()}")
        if self._f is None or self._sh["num_tokens"] >= self.shard_tokens:
            self._new_shard()
        self._f.write(a.astype(self.dtype, copy=False).tobytes())
        n = int(a.size)
        self._offsets.append(self._offsets[-1] + n)
        self._sh["documents"] += 1
        self._sh["num_tokens"] += n
        self.index["num_documents"] += 1
        self.index["num_tokens"] += n

    def close(self) -> dict:
        self._finish_shard()
        (self.tmp / INDEX).write_text(json.dumps(self.index, indent=1))
        old = None
        if self.out.exists():  # overwrite: move the old folder aside first, delete it after
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old)
        return self.index

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class TokenStream:
    """Endless, resumable stream of one pre-tokenized folder's documents (numpy id arrays)."""

    def __init__(self, src):
        self.src = src
        self.index = read_index(src.path, src.name)
        self.epoch = 0
        self.consumed = 0
        self._starts = []  # first global document index of each shard
        n = 0
        for sh in self.index["shards"]:
            self._starts.append(n)
            n += sh["documents"]
        self.num_documents = n
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def check_tokenizer(self, tok) -> None:
        """The ids were made by this tokenizer (same fingerprint); skipped when `tok` is unknown."""
        fp = getattr(tok, "fingerprint", None)
        if fp is None:
            return
        want, have = self.index["tokenizer"].get("sha256"), fp()
        if want != have:
            raise DataError(f"data source {self.src.name!r}: {self.src.path} was tokenized with "
                            f"{self.index['tokenizer'].get('name')!r} (sha256 {str(want)[:12]}), not with the "
                            f"training tokenizer {getattr(tok, 'path', '?')!r} (sha256 {have[:12]}): "
                            f"re-run openmoe.data.pretokenize with this tokenizer")

    def state(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state(self, s: dict) -> None:
        self.epoch, self.consumed = int(s["epoch"]), int(s["consumed"])

    def _shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._maps:
            sh, root = self.index["shards"][i], Path(self.src.path)
            tok = np.memmap(root / sh["tokens"], dtype=np.dtype(self.index["dtype"]), mode="r") \
                if sh["num_tokens"] else np.zeros(0, dtype=self.index["dtype"])
            off = np.fromfile(root / sh["offsets"], dtype=np.uint64)
            if len(off) != sh["documents"] + 1 or int(off[-1]) != len(tok):
                raise DataError(f"data source {self.src.name!r}: shard {sh['tokens']} does not match its "
                                f"offsets ({len(tok)} tokens, offsets end at {int(off[-1]) if len(off) else '-'})")
            self._maps[i] = (tok, off)
        return self._maps[i]

    def document(self, k: int) -> np.ndarray:
        i = bisect.bisect_right(self._starts, k) - 1
        tok, off = self._shard(i)
        j = k - self._starts[i]
        return tok[int(off[j]):int(off[j + 1])]

    def next(self) -> np.ndarray:
        if self.consumed >= self.num_documents:
            self.epoch, self.consumed = self.epoch + 1, 0
        ids = self.document(self.consumed)
        self.consumed += 1
        return ids
