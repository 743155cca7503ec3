"""manifest.json: the sha256 and size of every file of a checkpoint or exported model folder.

Written last (through a temporary file renamed into place), so a folder with a manifest is a
folder that was written whole; verified before loading, so a flipped byte or a truncated file
is named instead of loaded. Files are hashed in 1 MiB reads (never whole into memory).

A training checkpoint's DCP `.metadata` is a pickle: loading it can run code. `--resume`
therefore refuses a checkpoint without a manifest unless told to trust it, and verifies the
manifest (hence `.metadata`) before DCP opens anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
_SKIP = {MANIFEST, ".lock"}
_CHUNK = 1 << 20


class ManifestError(ValueError):
    """A folder that does not match its manifest (or has none where one is required)."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in _SKIP
                  and not any(part.startswith(".tmp") or ".tmp-" in part for part in p.relative_to(folder).parts))


def write_manifest(folder: str | os.PathLike, known: dict[str, str] | None = None) -> Path:
    """Hash every file under `folder` (but the manifest itself) into folder/manifest.json.
    `known`: relative path -> sha256 of files the writer already hashed from their final bytes
    (the converter's shards, hashed as they are written); those are not read again."""
    folder = Path(folder)
    known = known or {}
    files = {}
    for p in _files(folder):
        rel = p.relative_to(folder).as_posix()
        files[rel] = {"sha256": known.get(rel) or sha256_file(p), "size": p.stat().st_size}
    out = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"version": 1, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out


def has_manifest(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def verify_manifest(folder: str | os.PathLike, required: bool = True) -> bool:
    """Check every file listed in folder/manifest.json (size, then sha256). Returns False when
    there is no manifest and it is not required; raises ManifestError naming the file otherwise.
    Files not listed are allowed (a later tokenizer, a README) but never the DCP metadata."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        if required:
            raise ManifestError(f"{folder}: no {MANIFEST}")
        return False
    try:
        files = json.loads(mpath.read_text())["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ManifestError(f"{mpath}: not a valid manifest") from None
    for rel, want in sorted(files.items()):
        p = folder / rel
        if not p.is_file():
            raise ManifestError(f"{p}: listed in {MANIFEST} but missing")
        if p.stat().st_size != want.get("size"):
            raise ManifestError(f"{p}: size {p.stat().st_size} bytes, {MANIFEST} says {want.get('size')} "
                                f"(truncated or replaced)")
        if sha256_file(p) != want.get("sha256"):
            raise ManifestError(f"{p}: sha256 does not match {MANIFEST} (corrupted or modified)")
    if (folder / ".metadata").is_file() and ".metadata" not in files:
        raise ManifestError(f"{folder / '.metadata'}: not listed in {MANIFEST}")
    return True
