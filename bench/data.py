"""Data path throughput: tokens/s of each way the trainer can be fed, against what a GPU consumes.

    python bench/data.py [--mb 16] [--vocab 32000] [--seq-len 2048] [--batch 8] [--num-proc 1,2]

On a RedPajama-like (prose, `text`) + Stack-like (code, `content`) corpus of real files found on
the machine (licence texts, READMEs and docs; site-packages Python sources), written here as jsonl
and parquet, with a sentencepiece unigram model trained here (the umT5 model is on the hub,
unreachable offline; its 256k vocabulary makes somewhat fewer, longer tokens per character):
  tokenizer only       encode of every document, one process: sentencepiece (a .model tokenizer)
                       and the same vocabulary as an HF fast tokenizer (how google/umt5-small loads)
  jsonl -> batches     PackedMixture over the jsonl files, tokenising in the trainer's process
                       (what train.py does for a text source): [batch, seq] batches per second
  parquet -> batches   the same over parquet files
  N tokenizer workers  a text source with `workers: N` (data/workers.py): the trainer process reads
                       and packs, N forked processes per source tokenise ahead
  pretokenize N proc   `openmoe.data.pretokenize` with N worker processes (read, tokenise, write)
Processes counts the trainer/main process too where it works alongside workers; "per core used"
divides by min(processes, cores). Every process tokenises on one thread (TOKENIZERS_PARALLELISM=false).
  tokens -> batches    PackedMixture over the pre-tokenized folders (memmap read + packing)
The target is the trainer's consumption: base width on one H200 trains ~220k tokens/s
(docs/benchmarks.md); per-core rates say how many cores a path needs to keep up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from common import describe_machine  # noqa: E402

GPU_TOKENS_PER_S = 220_000  # base width, one H200 (docs/benchmarks.md)


def _read_files(roots, exts, limit_bytes):
    """Real documents found on this machine, one per file, in sorted order, up to limit_bytes."""
    import sysconfig
    from pathlib import Path

    out, size = [], 0
    for root in roots:
        root = root.replace("{purelib}", sysconfig.get_paths()["purelib"])
        for f in sorted(Path(root).rglob("*")) if os.path.isdir(root) else []:
            if not (f.is_file() and (not exts or f.name.endswith(exts)) and not f.name.endswith(".gz")):
                continue
            try:
                t = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if len(t) < 500:
                continue
            out.append(t)
            size += len(t)
            if size >= limit_bytes:
                return out
    return out


def local_corpus(mb: float):
    """Prose: licence texts, READMEs and docs (/usr/share/doc, site-packages .md/.rst/.txt); code:
    site-packages .py files. Stand-ins for RedPajama (`text`) and The Stack (`content`)."""
    prose = _read_files(["/usr/share/doc", "{purelib}"], (".md", ".rst", ".txt", "copyright", "README", "NEWS",
                                                          "TODO", "changelog"), mb * 1e6 / 2)
    code = _read_files(["{purelib}"], (".py",), mb * 1e6 / 2)
    return prose, code


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=16, help="corpus size (half prose, half code)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--num-proc", default="1,2")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: rates per core
    import pyarrow as pa
    import pyarrow.parquet as pq

    from openmoe.data import PackedMixture, SourceConfig, TextTokenizer, train_sentencepiece
    from openmoe.data.pretokenize import pretokenize

    print(describe_machine())
    print(f"cores visible: {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} (other jobs share them)")
    tmp = tempfile.mkdtemp(prefix="bench_data_")
    prose, code = local_corpus(a.mb)
    for name, field, texts in (("rp", "text", prose), ("stack", "content", code)):
        with open(f"{tmp}/{name}.jsonl", "w") as f:
            for t in texts:
                f.write(json.dumps({field: t}) + "\n")
        pq.write_table(pa.table({field: texts}), f"{tmp}/{name}.parquet", row_group_size=500)
    mb = sum(len(t) for t in prose + code) / 1e6
    sample = [t[:20000] for t in prose[::4] + code[::4]]  # ~1/4 of the corpus trains the tokenizer
    (model, dt) = timed(lambda: train_sentencepiece(sample, f"{tmp}/spm", a.vocab))
    tok = TextTokenizer(model)
    print(f"corpus: {len(prose)} prose + {len(code)} code documents, {mb:.1f} MB; sentencepiece unigram "
          f"vocab {len(tok)} (trained in {dt:.0f} s); batches [{a.batch}, {a.seq_len}]\n")

    tok.hf.save_pretrained(f"{tmp}/hf")  # the same vocabulary as an HF fast tokenizer folder
    toks = {"sentencepiece": (model, tok), "HF fast": (f"{tmp}/hf", TextTokenizer(f"{tmp}/hf"))}
    rows = []
    texts = prose + code
    for kind, (path, t) in toks.items():
        ids, dt = timed(lambda: [t.encode(x) for x in texts])
        n_tok = sum(len(x) for x in ids)
        rows.append((f"tokenizer only, {kind} (encode per document)", 1, n_tok / dt))
    print(f"{n_tok} tokens, {n_tok / (mb * 1e6):.3f} tokens/char")

    def batches(srcs, n_tokens, encode):
        m = PackedMixture(srcs, encode, a.seq_len, a.batch, seed=0)
        per = a.seq_len * a.batch
        n = max(1, n_tokens // per)
        m.next_batch()  # open the streams (file listing, first read) outside the timing
        _, t = timed(lambda: [m.next_batch() for _ in range(n)])
        return n * per / t

    budget = int(n_tok * 0.8) // 2  # stay within one epoch of the smaller source
    for kind, (path, t) in toks.items():
        for ext in ("jsonl", "parquet"):
            srcs = [SourceConfig(name="rp", path=f"{tmp}/rp.{ext}", weight=0.5),
                    SourceConfig(name="stack", path=f"{tmp}/stack.{ext}", text_field="content", weight=0.5)]
            rows.append((f"{ext} -> batches, {kind} in the trainer process", 1, batches(srcs, budget, t.encode)))
    for n in [int(x) for x in a.num_proc.split(",")]:
        srcs = [SourceConfig(name="rp", path=f"{tmp}/rp.jsonl", weight=0.5, workers=n),
                SourceConfig(name="stack", path=f"{tmp}/stack.jsonl", text_field="content", weight=0.5, workers=n)]
        rows.append((f"jsonl -> batches, HF fast in {n} tokenizer worker{'s' if n > 1 else ''} per source", 2 * n + 1,
                     batches(srcs, budget, toks["HF fast"][1].encode)))
    for kind, (path, t) in toks.items():
        for n in [int(x) for x in a.num_proc.split(",")]:
            t0 = time.perf_counter()
            tot = 0
            for name, field in (("rp", "text"), ("stack", "content")):
                idx = pretokenize(SourceConfig(name=name, path=f"{tmp}/rp.jsonl" if name == "rp" else
                                               f"{tmp}/stack.jsonl", text_field=field), path,
                                  f"{tmp}/tok{n}_{name}", num_proc=n, overwrite=True, log=lambda *_: None)
                tot += idx["num_tokens"]
            rows.append((f"pretokenize jsonl, {kind}, {n} worker process{'es' if n > 1 else ''}", n + (n > 1),
                         tot / (time.perf_counter() - t0)))
    first = a.num_proc.split(",")[0]
    srcs = [SourceConfig(name="rp", path=f"{tmp}/tok{first}_rp", weight=0.5),
            SourceConfig(name="stack", path=f"{tmp}/tok{first}_stack", weight=0.5)]
    rows.append(("pre-tokenized -> batches (memmap read + pack)", 1,
                 batches(srcs, 4 * budget, toks["HF fast"][1].encode)))

    cores = os.cpu_count() or 1
    gpu = f"x one H200 base-width step ({GPU_TOKENS_PER_S // 1000}k tok/s)"
    print(f"\n| path | processes | tokens/s | per core used | {gpu} |")
    print("|---|---|---|---|---|")
    for name, procs, r in rows:
        print(f"| {name} | {procs} | {r:,.0f} | {r / min(procs, cores):,.0f} | {r / GPU_TOKENS_PER_S:.2f}x |")
    by = {name: r for name, _, r in rows}
    hf = by["tokenizer only, HF fast (encode per document)"]
    trainer = by["jsonl -> batches, HF fast in the trainer process"]
    print(f"\nOne H200 trains base width at ~{GPU_TOKENS_PER_S:,} tokens/s and every rank packs the global "
          f"batch (W GPUs: W x that per rank). Tokenising with the HF fast tokenizer in the trainer's process "
          f"gives {trainer:,.0f} tokens/s here; pre-tokenizing needs ~{GPU_TOKENS_PER_S / hf:.2f} core-seconds "
          f"of tokenisation per GPU-second ({hf:,.0f} tokens/s per core).")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
