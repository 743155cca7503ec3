"""Text sources: hub datasets (streaming) or local files, in RedPajama (`text`) or The Stack
(`content`) schemas, read as resumable streams of documents.

A source is described by a SourceConfig. `path` is either
  - a hub dataset name (e.g. togethercomputer/RedPajama-Data-1T-Sample, bigcode/the-stack-dedup
    with data_dir="data/python" as the language filter), loaded with `datasets` in streaming mode;
  - a local file or glob of .jsonl / .json / .json.gz / .jsonl.gz / .parquet files (through
    `datasets` builders, streaming); or
  - a local folder of plain files (e.g. source code or .txt), each file one document; or, with
    `data_dir` or `config` set, a local copy of a hub dataset repo (`hf download --repo-type dataset`),
    loaded exactly as the hub name would be;
  - a folder of pre-tokenized shards written by `python -m openmoe.data.pretokenize` (detected by
    its `index.json`, or `format: tokens`): read by `tokens.TokenStream`, no tokenizer at train time.
Streams are resumable: `DocumentStream.state()` is (epoch, documents consumed in this epoch).

Hub corpora as the hub serves them today (`datasets` >= 4 loads no dataset scripts; see
docs/data.md): RedPajama-1T is script-based, so use its parquet conversion
(`revision: refs/convert/parquet`, `data_dir: <subset>/partial-train`, a partial copy) or the
deduplicated successor `cerebras/SlimPajama-627B` (jsonl.zst, needs `zstandard`); The Stack
(`bigcode/the-stack-dedup`, parquet under `data/<lang>/`) is gated: accept its terms on the dataset
page and authenticate (HF_TOKEN or `huggingface-cli login`). Both failures become one-line
DataErrors that say so (`hub_error`).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import DataError

JSON_EXT = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst")  # .zst (SlimPajama): needs zstandard
PARQUET_EXT = (".parquet",)


@dataclass
class SourceConfig:
    name: str
    path: str
    text_field: str = "text"  # RedPajama: text; The Stack: content
    weight: float = 1.0
    kind: str = "text"  # "text" (pre-training) or "chat" (messages / prompt+response)
    data_dir: str | None = None  # hub: sub-folder, e.g. The Stack's data/python
    split: str = "train"
    revision: str | None = None  # hub: branch/tag/commit, e.g. refs/convert/parquet
    config: str | None = None  # hub: configuration name (load_dataset's `name`)
    format: str | None = None  # "tokens": a pre-tokenized shard folder (auto-detected by its index.json)
    workers: int = 0  # text sources: tokenise in this many worker processes (data/workers.py)
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md", ".rst", ".py"])  # folders

    @classmethod
    def from_dict(cls, d: dict) -> "SourceConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise DataError(f"data source {d.get('name', '?')!r}: unknown keys {sorted(unknown)}")
        if "name" not in d or "path" not in d:
            raise DataError(f"data source {d}: needs 'name' and 'path'")
        src = cls(**d)
        if not (isinstance(src.weight, (int, float)) and src.weight > 0):
            raise DataError(f"data source {src.name!r}: weight must be > 0, got {src.weight!r}")
        if src.kind not in ("text", "chat"):
            raise DataError(f"data source {src.name!r}: kind must be 'text' or 'chat', got {src.kind!r}")
        if not (isinstance(src.workers, int) and src.workers >= 0):
            raise DataError(f"data source {src.name!r}: workers must be an integer >= 0, got {src.workers!r}")
        if src.format not in (None, "text", "tokens"):
            raise DataError(f"data source {src.name!r}: format must be 'text' or 'tokens', got {src.format!r}")
        return src

    def is_tokens(self) -> bool:
        """A pre-tokenized shard folder (format: tokens, or a folder holding an openmoe index.json)."""
        from .tokens import is_token_folder

        return self.format == "tokens" or (self.format is None and is_token_folder(self.path))


def _is_local(path: str) -> bool:
    return os.path.exists(path) or any(c in path for c in "*?[") or path.startswith(("/", "./", "../"))


def _local_files(src: SourceConfig) -> list[str]:
    p = src.path
    files = sorted(glob.glob(p, recursive=True)) if any(c in p for c in "*?[") else [p]
    if not files or not all(os.path.exists(f) for f in files):
        raise DataError(f"data source {src.name!r}: no such file or folder: {p}")
    return files


def check_source(src: SourceConfig) -> None:
    """Cheap start-up check: local paths exist and have a supported type."""
    if src.is_tokens():
        from .tokens import read_index

        read_index(src.path, src.name)
        return
    if _is_local(src.path):
        files = _local_files(src)
        if not (len(files) == 1 and os.path.isdir(files[0])):
            bad = [f for f in files if not f.endswith(JSON_EXT + PARQUET_EXT)]
            if bad:
                raise DataError(f"data source {src.name!r}: unsupported file type {bad[0]} "
                                f"(use .jsonl/.json[.gz], .jsonl.zst, .parquet, or a folder of text files)")


def _iter_folder(src: SourceConfig, folder: str) -> Iterator[dict]:
    paths = sorted(str(f) for f in Path(folder).rglob("*")
                   if f.is_file() and any(str(f).endswith(e) for e in src.extensions))
    for f in paths:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary or non-UTF-8 file in a code folder: not a document
        yield {src.text_field: text, "path": f}


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def hub_error(src: SourceConfig, e: BaseException, what: str = "cannot open") -> DataError:
    """One line that names the source and, for the two ways hub corpora fail today, what to do.

    `datasets` >= 4 raises RuntimeError("Dataset scripts are no longer supported, but found X.py")
    for script-based datasets (RedPajama-1T and its -Sample), and DatasetNotFoundError("Dataset 'X'
    is a gated dataset on the Hub. ...") from huggingface_hub's GatedRepoError (401: no token, 403:
    terms not accepted) when opening a gated one (The Stack); the same GatedRepoError can surface
    later, while streaming a file, as FileNotFoundError("... Cannot access gated repo ...")."""
    msgs = " | ".join(str(x) for x in _chain(e))
    names = {type(x).__name__ for x in _chain(e)}
    head = f"data source {src.name!r}: {what} {src.path}"
    if "Dataset scripts are no longer supported" in msgs:
        return DataError(
            f"{head}: it is a script-based dataset, which datasets>=4 no longer loads. Use its parquet "
            f"conversion (revision: refs/convert/parquet, data_dir: <config>/partial-train, where the hub "
            f"has one) or a maintained successor in parquet/jsonl (for RedPajama-1T: cerebras/SlimPajama-627B); "
            f"see docs/data.md")
    if "GatedRepoError" in names or any(k in msgs.lower() for k in ("gated dataset", "gated repo")):
        return DataError(
            f"{head}: gated dataset. Accept its terms at https://huggingface.co/datasets/{src.path} "
            f"with your account, then authenticate: set HF_TOKEN=<token> or run `huggingface-cli login` "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
    if "compression type zstd not supported" in msgs.lower():  # fsspec without `zstandard`
        return DataError(f"{head}: .zst files (SlimPajama's jsonl.zst) need the zstandard package: "
                         f"pip install zstandard")
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return DataError(f"{head}: {type(e).__name__}: {first}")  # one line


def _hf_stream(src: SourceConfig, files: list[str] | None):
    import datasets

    try:
        if files is None:  # hub dataset
            return datasets.load_dataset(src.path, src.config, data_dir=src.data_dir, split=src.split,
                                         revision=src.revision, streaming=True)
        builder = "parquet" if files[0].endswith(PARQUET_EXT) else "json"
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
    except StopIteration:  # datasets' json builder on a file with no rows
        raise DataError(f"data source {src.name!r}: {src.path} has no examples (empty file?)") from None
    except Exception as e:  # noqa: BLE001 - re-raised with the source named
        raise hub_error(src, e) from None


def raw_examples(src: SourceConfig) -> Iterator[dict]:
    """One epoch of raw examples (dicts) from a source, in a fixed order."""
    if _is_local(src.path):
        check_source(src)
        files = _local_files(src)
        if len(files) == 1 and os.path.isdir(files[0]) and (src.data_dir or src.config):
            stream = _hf_stream(src, None)  # a local copy of a hub dataset repo: the hub loading path
        elif len(files) == 1 and os.path.isdir(files[0]):
            yield from _iter_folder(src, files[0])
            return
        else:
            stream = _hf_stream(src, files)
    else:
        stream = _hf_stream(src, None)
    it = None
    n = 0
    while True:
        try:
            if it is None:
                it = iter(stream)
            ex = next(it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - a file that does not parse (or a gated hub file)
            raise hub_error(src, e, f"cannot parse (after {n} examples)") from None
        n += 1
        yield ex


class DocumentStream:
    """Endless, resumable stream of one source's examples: epochs repeat in the same order."""

    def __init__(self, src: SourceConfig):
        self.src = src
        self.epoch = 0
        self.consumed = 0  # examples consumed in the current epoch
        self._it: Iterator[dict] | None = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state(self, s: dict) -> None:
        self.epoch, self.consumed, self._it = int(s["epoch"]), int(s["consumed"]), None

    def _open(self) -> None:
        self._it = raw_examples(self.src)
        for _ in range(self.consumed):  # resume: skip what this epoch already gave
            next(self._it)

    def next(self) -> dict:
        if self._it is None:
            self._open()
        for _ in range(2):
            try:
                ex = next(self._it)
                self.consumed += 1
                self._check(ex)
                return ex
            except StopIteration:
                if self.consumed == 0:
                    raise DataError(f"data source {self.src.name!r}: {self.src.path} is empty") from None
                self.epoch, self.consumed = self.epoch + 1, 0
                self._it = raw_examples(self.src)
        raise DataError(f"data source {self.src.name!r}: {self.src.path} is empty")

    def _check(self, ex: dict) -> None:
        if self.src.kind == "chat":
            if "messages" not in ex and not ("prompt" in ex and "response" in ex):
                raise DataError(f"data source {self.src.name!r}: example {self.consumed} has neither "
                                f"'messages' nor 'prompt'+'response' (columns: {sorted(ex)})")
        elif self.src.text_field not in ex:
            raise DataError(f"data source {self.src.name!r}: missing column {self.src.text_field!r} "
                            f"in {self.src.path} (columns: {sorted(ex)})")
        elif not isinstance(ex[self.src.text_field], str):
            raise DataError(f"data source {self.src.name!r}: example {self.consumed} of {self.src.path}: column "
                            f"{self.src.text_field!r} is {type(ex[self.src.text_field]).__name__}, not text")
