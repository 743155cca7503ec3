"""Build a pre-tokenized folder (see tokens.py) from any text source, tokenizing in worker processes.

    python -m openmoe.data.pretokenize --source data/rp.jsonl --tokenizer spm.model --out tok/rp --num-proc 8
    python -m openmoe.data.pretokenize --source bigcode/the-stack-dedup --data-dir data/python \\
        --text-field content --tokenizer google/umt5-small --out tok/stack-python --num-proc 16

`--source` is anything a SourceConfig `path` takes (hub name, jsonl/parquet file or glob, folder).
The main process reads the source in order and hands chunks of `--chunk` texts to a
multiprocessing pool; results come back in order (`ordered_map`, bounded read-ahead), so the folder's documents are the
source's documents in the source's order whatever `--num-proc` is, and training on the folder
packs exactly what training on the text would. Then train with
`data: [{name: rp, path: tok/rp, weight: 1.0}]` (the index.json marks it as pre-tokenized).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import sys
import time

import numpy as np

from .sources import DataError, SourceConfig, raw_examples
from .tokenizer import TextTokenizer
from .tokens import TokenWriter

_TOK: TextTokenizer | None = None


def _init(path: str) -> None:
    global _TOK
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker
    _TOK = TextTokenizer(path)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = _TOK.encode_batch(texts)
    lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum()))
    return flat, lens


def _chunks(src: SourceConfig, size: int, max_docs: int | None):
    it = raw_examples(src)
    if max_docs is not None:
        it = itertools.islice(it, max_docs)
    n = 0
    while True:
        batch = []
        for ex in itertools.islice(it, size):
            n += 1
            if src.text_field not in ex:
                raise DataError(f"data source {src.name!r}: missing column {src.text_field!r} in {src.path} "
                                f"(columns: {sorted(ex)})")
            batch.append(ex[src.text_field])
        if not batch:
            return
        yield batch


def ordered_map(pool, fn, items, ahead: int):
    """pool.imap with at most `ahead` tasks in flight (imap reads its whole input at once, which a
    terabyte stream cannot afford); results in input order."""
    from collections import deque

    pending: deque = deque()
    for x in items:
        pending.append(pool.apply_async(fn, (x,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def pretokenize(src: SourceConfig, tokenizer: str, out: str, num_proc: int = 1, chunk: int = 256,
                shard_tokens: int = 1 << 28, max_docs: int | None = None, overwrite: bool = False,
                log=print) -> dict:
    tok = TextTokenizer(tokenizer)
    source = {"path": src.path, "text_field": src.text_field, "data_dir": src.data_dir, "split": src.split,
              "revision": src.revision, "config": src.config}
    writer = TokenWriter(out, len(tok), {"name": tokenizer, "sha256": tok.fingerprint()}, source,
                         shard_tokens=shard_tokens, overwrite=overwrite)
    t0, last = time.time(), time.time()
    pool = None
    try:
        chunks = _chunks(src, chunk, max_docs)
        if num_proc > 1:
            # fork shares the loaded modules; the tokenizer is loaded once per worker
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            pool = ctx.Pool(num_proc, initializer=_init, initargs=(tokenizer,))
            results = ordered_map(pool, _encode_chunk, chunks, 2 * num_proc)
        else:
            global _TOK
            _TOK = tok
            results = map(_encode_chunk, chunks)
        for flat, lens in results:
            start = 0
            for n in lens.tolist():
                writer.add(flat[start:start + n])
                start += n
            if time.time() - last > 10:
                last = time.time()
                idx = writer.index
                log(f"pretokenize: {idx['num_documents']} documents, {idx['num_tokens']} tokens, "
                    f"{idx['num_tokens'] / (last - t0):.0f} tokens/s")
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
    index = writer.close()
    dt = time.time() - t0
    log(f"pretokenize: wrote {out}: {index['num_documents']} documents, {index['num_tokens']} tokens "
        f"({index['dtype']}, {len(index['shards'])} shards) in {dt:.1f} s, "
        f"{index['num_tokens'] / max(dt, 1e-9):.0f} tokens/s with {num_proc} process(es)")
    return index


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m openmoe.data.pretokenize", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="hub dataset name, jsonl/parquet file or glob, or folder")
    ap.add_argument("--tokenizer", required=True, help="HF tokenizer folder/name or sentencepiece .model")
    ap.add_argument("--out", required=True, help="output folder (written atomically)")
    ap.add_argument("--text-field", default="text", help="text column (RedPajama: text; The Stack: content)")
    ap.add_argument("--data-dir", default=None, help="hub sub-folder, e.g. data/python")
    ap.add_argument("--revision", default=None, help="hub revision, e.g. refs/convert/parquet")
    ap.add_argument("--config", default=None, help="hub configuration name")
    ap.add_argument("--split", default="train")
    ap.add_argument("--num-proc", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--chunk", type=int, default=256, help="documents per task sent to a worker")
    ap.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file (about)")
    ap.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    src = SourceConfig(name=os.path.basename(a.out.rstrip("/")) or "source", path=a.source,
                       text_field=a.text_field, data_dir=a.data_dir, revision=a.revision, config=a.config,
                       split=a.split)
    try:
        pretokenize(src, a.tokenizer, a.out, a.num_proc, a.chunk, a.shard_tokens, a.max_docs, a.overwrite)
    except (DataError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
