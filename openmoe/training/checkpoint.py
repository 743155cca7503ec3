"""Training checkpoints: written to a temp folder and renamed into place only when complete,
keeping the last K. A folder named step_XXXXXXXX is always whole; temp folders left by a killed
run are ignored and cleaned up.

Contents: model.safetensors (weights), optimizer.pt + scheduler.pt, rng.pt (torch RNG states),
trainer_state.json (step, data position, metrics counters).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_RE = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def save(ckpt_root: str | Path, step: int, model, optimizer, scheduler, state: dict, keep_last: int) -> Path:
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)  # atomic: the step folder appears only when whole
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name))


def latest(root: str | Path) -> Path | None:
    for leftover in Path(root).glob(".tmp_step_*") if Path(root).is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)  # a save interrupted by a kill
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def load(path: Path, model, optimizer, scheduler) -> dict:
    needed = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise ValueError(f"checkpoint {path}: missing {missing}")
    sd = load_file(path / "model.safetensors")
    result = model.load_state_dict(sd, strict=True)
    del result
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "trainer_state.json").read_text())
