"""Training checkpoints: written to a temp folder and renamed into place only when complete,
keeping the last K. A folder named step_XXXXXXXX is always whole; temp folders left by a killed
run are ignored and cleaned up.

Layout: step_XXXXXXXX/trainer_state.json (step, data position, world/ep layout),
scheduler.pt, and one rankNNNNN/ folder per process with that rank's model.safetensors (its
expert shard under EP), optimizer.pt and rng.pt. Resuming needs the same world and ep sizes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..parallel.mesh import ParallelState

STEP_RE = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def _barrier(ps: ParallelState) -> None:
    if ps.distributed:
        dist.barrier()


def save(ckpt_root: str | Path, step: int, model, optimizer, scheduler, state: dict, keep_last: int,
         ps: ParallelState | None = None) -> Path:
    ps = ps or ParallelState()
    root = Path(ckpt_root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if ps.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(ps)
    mine = tmp / f"rank{ps.rank:05d}"
    mine.mkdir()
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, mine / "model.safetensors")
    torch.save(optimizer.state_dict(), mine / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, mine / "rng.pt")
    _fsync_dir(mine)
    if ps.is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": step, "world": ps.world, "ep": ps.ep, **state}))
    _barrier(ps)
    if ps.is_main:
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)  # atomic: the step folder appears only when whole
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(ps)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name))


def latest(root: str | Path, ps: ParallelState | None = None) -> Path | None:
    ps = ps or ParallelState()
    if ps.is_main and Path(root).is_dir():
        for leftover in Path(root).glob(".tmp_step_*"):
            shutil.rmtree(leftover, ignore_errors=True)  # a save interrupted by a kill
    _barrier(ps)
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def load(path: Path, model, optimizer, scheduler, ps: ParallelState | None = None) -> dict:
    ps = ps or ParallelState()
    mine = path / f"rank{ps.rank:05d}"
    needed = [path / "trainer_state.json", path / "scheduler.pt", mine / "model.safetensors",
              mine / "optimizer.pt", mine / "rng.pt"]
    missing = [str(n.relative_to(path)) for n in needed if not n.is_file()]
    if missing:
        raise ValueError(f"checkpoint {path}: missing {missing}")
    state = json.loads((path / "trainer_state.json").read_text())
    if (state.get("world", 1), state.get("ep", 1)) != (ps.world, ps.ep):
        raise ValueError(f"checkpoint {path} was written with world={state.get('world', 1)} "
                         f"ep={state.get('ep', 1)}; this run has world={ps.world} ep={ps.ep}. Resume with "
                         f"the same layout (resharding to another world size is not supported yet)")
    model.load_state_dict(load_file(mine / "model.safetensors"), strict=True)
    optimizer.load_state_dict(torch.load(mine / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(mine / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
