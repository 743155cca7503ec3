"""Text sources: hub datasets (streaming) or local files, in RedPajama (`text`) or The Stack
(`content`) schemas, read as resumable streams of documents.

A source is described by a SourceConfig. `path` is either
  - a hub dataset name (e.g. togethercomputer/RedPajama-Data-1T-Sample, bigcode/the-stack-dedup
    with data_dir="data/python" as the language filter), loaded with `datasets` in streaming mode;
  - a local file or glob of .jsonl / .json / .json.gz / .jsonl.gz / .parquet files (through
    `datasets` builders, streaming); or
  - a local folder of plain files (e.g. source code or .txt), each file one document.
Streams are resumable: `DocumentStream.state()` is (epoch, documents consumed in this epoch).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

JSON_EXT = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_EXT = (".parquet",)


class DataError(ValueError):
    """A data source that cannot be used: names the source and the file or column."""


@dataclass
class SourceConfig:
    name: str
    path: str
    text_field: str = "text"  # RedPajama: text; The Stack: content
    weight: float = 1.0
    kind: str = "text"  # "text" (pre-training) or "chat" (messages / prompt+response)
    data_dir: str | None = None  # hub: sub-folder, e.g. The Stack's data/python
    split: str = "train"
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
        return src


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
    if _is_local(src.path):
        files = _local_files(src)
        if not (len(files) == 1 and os.path.isdir(files[0])):
            bad = [f for f in files if not f.endswith(JSON_EXT + PARQUET_EXT)]
            if bad:
                raise DataError(f"data source {src.name!r}: unsupported file type {bad[0]} "
                                f"(use .jsonl/.json[.gz], .parquet, or a folder of text files)")


def _iter_folder(src: SourceConfig, folder: str) -> Iterator[dict]:
    paths = sorted(str(f) for f in Path(folder).rglob("*")
                   if f.is_file() and any(str(f).endswith(e) for e in src.extensions))
    for f in paths:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary or non-UTF-8 file in a code folder: not a document
        yield {src.text_field: text, "path": f}


def _hf_stream(src: SourceConfig, files: list[str] | None):
    import datasets

    try:
        if files is None:  # hub dataset
            return datasets.load_dataset(src.path, data_dir=src.data_dir, split=src.split, streaming=True)
        builder = "parquet" if files[0].endswith(PARQUET_EXT) else "json"
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
    except StopIteration:  # datasets' json builder on a file with no rows
        raise DataError(f"data source {src.name!r}: {src.path} has no examples (empty file?)") from None
    except Exception as e:  # noqa: BLE001 - re-raised with the source named
        raise DataError(f"data source {src.name!r}: cannot open {src.path}: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None


def raw_examples(src: SourceConfig) -> Iterator[dict]:
    """One epoch of raw examples (dicts) from a source, in a fixed order."""
    if _is_local(src.path):
        check_source(src)
        files = _local_files(src)
        if len(files) == 1 and os.path.isdir(files[0]):
            yield from _iter_folder(src, files[0])
            return
        stream = _hf_stream(src, files)
    else:
        stream = _hf_stream(src, None)
    it = iter(stream)
    n = 0
    while True:
        try:
            ex = next(it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - a file that does not parse
            raise DataError(f"data source {src.name!r}: cannot parse {src.path} after {n} examples: "
                            f"{type(e).__name__}: {str(e)[:300]}") from None
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
