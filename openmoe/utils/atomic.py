"""Folders that appear whole or not at all: every output folder (converted checkpoint, training
checkpoint, exported HF folder, LoRA adapter, base and merged folders) is written into a
temporary sibling (same filesystem, so the rename is atomic), gets its manifest.json last (the
sha256 of every file: utils/manifest.py), is optionally synced, and only then is renamed to its
name. A failure or an interrupt (SIGTERM too, under utils.cli.install_signal_handlers) removes
the temporary folder.

    with atomic_folder(out / "final") as tmp:
        model.save_pretrained(tmp)

A write shared by several ranks (a training checkpoint) uses the two halves with a barrier
between them: `fresh_folder` on one rank, every rank writes, `publish_folder` on one rank.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .cli import remove_stale_temps, tmp_sibling
from .manifest import write_manifest


def fresh_folder(tmp: str | os.PathLike) -> Path:
    """An empty folder at `tmp` (what a killed write left there removed first)."""
    tmp = Path(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def fsync_folder(folder: Path, files: bool = True) -> None:
    """Sync the files directly in `folder` (with files=True), then its entries."""
    if files:
        for p in folder.iterdir():  # small files (config, tokenizer) too
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # a filesystem that cannot sync a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def publish_folder(tmp: str | os.PathLike, final: str | os.PathLike, *, manifest: bool = True,
                   fsync: bool = False, replace: bool = True) -> Path:
    """Rename the written folder `tmp` to `final`: its manifest first (last in the folder), then,
    with fsync, its files and the rename synced to disk. An existing `final` is removed first
    with replace=True; with replace=False only an empty one may be replaced (OSError otherwise)."""
    tmp, final = Path(tmp), Path(final)
    if manifest:
        write_manifest(tmp)
    if fsync:
        fsync_folder(tmp)
    if final.is_dir() and replace:
        shutil.rmtree(final)
    elif final.exists():
        final.rmdir()  # fails on anything but an empty folder: nothing is ever lost
    os.rename(tmp, final)
    if fsync:
        fsync_folder(final.parent, files=False)
    return final


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike, *, manifest: bool = True, fsync: bool = False,
                  replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final` to write; published as `final` on success
    (see publish_folder), removed on any error or interrupt. Temporary folders that dead
    processes left beside `final` are removed first."""
    final = Path(final)
    remove_stale_temps(final)  # leftovers of runs killed with SIGKILL (SIGTERM/SIGINT clean up below)
    tmp = fresh_folder(tmp_sibling(final))
    try:
        yield tmp
        publish_folder(tmp, final, manifest=manifest, fsync=fsync, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
