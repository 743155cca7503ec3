"""Tokenising a streamed text source in worker processes, with the exact resume of DocumentStream.

A source with `workers: N` (N > 0, text sources) is read in order by the trainer's process and
its texts are sent in chunks to N forked worker processes that run the training tokenizer; results
come back in order, at most 2N chunks ahead. Every example carries its (epoch, index in epoch), and
the stream's state is the position of the last document *handed to the packer*, so it is the
same state DocumentStream keeps, whatever N is (0, 1, 8): a run saved with 8 workers resumes
exactly with 2 or none, and read-ahead that was never packed is simply read again.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterator

import numpy as np

from .sources import DataError, SourceConfig, raw_examples

_ENCODE = None


def _init(encode) -> None:  # runs in the forked worker: `encode` is inherited, not pickled
    global _ENCODE
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _ENCODE = encode


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = [_ENCODE(t) for t in texts]
    lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum())), lens


def can_fork() -> bool:
    return "fork" in mp.get_all_start_methods()


class TokenizingStream:
    """Endless, resumable stream of one text source's documents as id arrays, tokenised ahead in
    `src.workers` processes. Same state as sources.DocumentStream."""

    def __init__(self, src: SourceConfig, encode, chunk: int = 64):
        self.src, self.encode, self.chunk = src, encode, chunk
        self.workers = int(src.workers)
        self.epoch = 0
        self.consumed = 0
        self._pool = None
        self._reset()

    # ---- state
    def state(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state(self, s: dict) -> None:
        self.epoch, self.consumed = int(s["epoch"]), int(s["consumed"])
        self._reset()

    def _reset(self) -> None:
        self._reader: Iterator | None = None
        self._pending: deque = deque()  # chunks in flight: (positions, Future)
        self._ready: deque = deque()  # (epoch, index, ids) ready to hand out

    # ---- reading
    def _positions(self) -> Iterator[tuple[int, int, str]]:
        """(epoch, index in epoch, text) from the current position on, forever."""
        epoch, skip = self.epoch, self.consumed
        while True:
            n = 0
            for ex in itertools.islice(raw_examples(self.src), skip, None):
                if self.src.text_field not in ex:
                    raise DataError(f"data source {self.src.name!r}: missing column {self.src.text_field!r} "
                                    f"in {self.src.path} (columns: {sorted(ex)})")
                yield epoch, skip + n, ex[self.src.text_field]
                n += 1
            if skip + n == 0:
                raise DataError(f"data source {self.src.name!r}: {self.src.path} is empty")
            epoch, skip = epoch + 1, 0

    def _submit(self) -> bool:
        items = list(itertools.islice(self._reader, self.chunk))
        if not items:
            return False
        texts = [t for _, _, t in items]
        pos = [(e, i) for e, i, _ in items]
        if self._pool is None:
            # an executor, not multiprocessing.Pool: a worker that dies (killed, out of memory)
            # breaks the executor and every waiting future says so, where Pool would wait forever
            # for the chunk the dead worker held
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("fork"),
                                             initializer=_init, initargs=(self.encode,))
        self._pending.append((pos, self._pool.submit(_encode_chunk, texts)))
        return True

    def _fill(self) -> None:
        if self._reader is None:
            self._reader = self._positions()
        while len(self._pending) < 2 * self.workers and self._submit():
            pass
        pos, res = self._pending.popleft()
        try:
            flat, lens = res.result()
        except BrokenProcessPool:
            self.close()
            raise DataError(f"data source {self.src.name!r}: a tokenizer worker process died (killed or out of "
                            f"memory?); lower `workers` ({self.workers}) or set it to 0") from None
        start = 0
        for (e, i), n in zip(pos, lens.tolist()):
            self._ready.append((e, i, flat[start:start + n]))
            start += n
        self._submit()  # keep the workers busy while these are packed

    def next(self) -> np.ndarray:
        if not self._ready:
            self._fill()
        e, i, ids = self._ready.popleft()
        self.epoch, self.consumed = e, i + 1
        return ids

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            self._pending.clear()
            pool.shutdown(wait=False, cancel_futures=True)  # what was submitted ahead is not run

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
