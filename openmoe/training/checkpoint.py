"""Training checkpoints with torch.distributed.checkpoint (DCP): sharded, and resumable at a
different world size, EP size or expert sharding.

Each rank contributes its part and every tensor is described by its GLOBAL shape, so a
checkpoint does not depend on the layout that wrote it:
  - replicated tensors once (DCP de-duplicates them);
  - FSDP2 shards of non-expert tensors as the DTensors FSDP2 made (sharded over all ranks, or
    under hybrid sharding over the 2-D (replicate, shard) mesh with [Replicate(), Shard(0)]:
    DCP writes each shard once and reads it into every replica);
  - expert tensors (parameters and their per-expert optimizer states: AdamW's moments,
    Adafactor's factored [E, H, 1] / [E, 1, I] statistics) as global [E, ...] DTensors in
    LOGICAL expert order (a balanced run's experts are moved to logical order around the save,
    parallel/balance.logical_order, and back; a resumed run loads them in logical order and the
    trainer moves them to the saved placement), so any ep and any placement reads expert e as
    expert e. Replicated over dp, EP blocks as DTensors over the (dp, ep) mesh with
    [Replicate(), Shard(0)]; FSDP-sharded over dp (parallel/fsdp.py, fsdp_experts) as DTensors
    over the same ranks ordered (ep, dp) with [Shard(0), Shard(0)]: the rank at (dp = d,
    ep = e) holds rows chunk d (torch.chunk, uneven when E_l % dp != 0) of EP block e, which is
    exactly FSDP2's shard, so DCP writes from and reads into the parameter's own storage.
Loading builds the same description for the *current* layout and DCP reads the slices each
rank needs, whatever layout wrote them (one process, ep/dp/world changed, experts sharded or
not).

Layout of step_XXXXXXXX/: DCP files (model and optimizer tensors), trainer_state.json (step,
data position, scheduler, layout), rng_rankNNNNN.pt and, written last, manifest.json (the sha256
of every file: utils/manifest.py). The folder is written as .tmp_step_* and renamed only when
whole; leftovers of a killed save are removed on resume.

The weights and optimizer state are checked finite before a save (`non_finite`): a diverged
step is never saved, so the newest checkpoint is always a good one. `load` verifies the manifest
before DCP reads anything: DCP's `.metadata` is a pickle, and unpickling a crafted one runs code,
so a checkpoint without a manifest is refused unless the caller trusts it.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ..parallel.balance import logical_order
from ..parallel.fsdp import global_expert
from ..parallel.layers import expert_parallel_layers
from ..parallel.grads import is_expert, is_expert_state, is_sharded
from ..parallel.mesh import ParallelState
from ..utils.atomic import fresh_folder, publish_folder
from ..utils.manifest import ManifestError, has_manifest, verify_manifest
from .adafactor import factored_zeros

STEP_RE = re.compile(r"^step_(\d{8})$")


def _barrier(ps: ParallelState) -> None:
    if ps.distributed:
        dist.barrier()


def _global(t: torch.Tensor, sharded: bool, ps: ParallelState):
    """The tensor as DCP should see it: an expert block of this EP rank becomes a global
    [E, ...] DTensor, over (dp, ep) when replicated over dp, over (ep, dp) when FSDP2 shards it
    over dp. (At ep = 1 an FSDP-sharded expert is already global: DCP takes it as it is.)"""
    if not (sharded and ps.distributed and ps.ep > 1):
        return t
    if is_sharded(t):
        return global_expert(t, ps)
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return DTensor.from_local(t, ps.mesh, [Replicate(), Shard(0)], run_check=False)


def _global_shape(p: torch.Tensor, ps: ParallelState) -> tuple:
    shape = tuple(p.shape)  # a DTensor reports its (EP-local) global shape
    if is_expert(p) and ps.distributed and ps.ep > 1 and shape:
        shape = (shape[0] * ps.ep, *shape[1:])
    return shape


def _params(model) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())


def _model_state(model, ps: ParallelState) -> dict:
    params = _params(model)
    return {f"model.{k}": _global(v.detach(), k in params and is_expert(params[k]), ps)
            for k, v in model.state_dict().items()}


def _optim_state(model, optimizer, ps: ParallelState) -> dict:
    out = {}
    for name, p in _params(model).items():
        for k, v in optimizer.state.get(p, {}).items():
            if torch.is_tensor(v):  # per-expert states (Adafactor's factors too) are split like p
                out[f"optim.{name}.{k}"] = _global(v, is_expert_state(p, v), ps)
    return out


def save(ckpt_root: str | Path, step: int, model, optimizer, scheduler, state: dict, keep_last: int,
         ps: ParallelState | None = None) -> Path:
    ps = ps or ParallelState()
    root = Path(ckpt_root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if ps.is_main:  # one folder for all ranks: its name is the step's, not a pid's
        fresh_folder(tmp)
    _barrier(ps)
    try:
        with warnings.catch_warnings(), logical_order(model, optimizer, ps):
            warnings.simplefilter("ignore")  # single-process DCP warns that it assumes one process
            dcp.save({**_model_state(model, ps), **_optim_state(model, optimizer, ps)}, checkpoint_id=str(tmp))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / f"rng_rank{ps.rank:05d}.pt")
    except BaseException as e:  # noqa: BLE001  (DCP's CheckpointException is a BaseException)
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(e, tmp) from None
    if ps.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": step, "world": ps.world, "ep": ps.ep, "expert_order": "logical",
             "scheduler": scheduler.state_dict(), **state}))
    _barrier(ps)
    if ps.is_main:  # the manifest last, every rank's files in it; the step folder appears only when whole
        publish_folder(tmp, final, fsync=True)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(ps)
    return final


def _write_error(e: BaseException, tmp: Path) -> BaseException:
    """A failed write as an OSError naming the folder: ENOSPC named as such (torch.save reports
    a full disk as a RuntimeError from inline_container.cc, DCP wraps errors of its own)."""
    import errno

    from ..utils.cli import _unwrap

    inner = _unwrap(e)
    if isinstance(inner, OSError):
        return OSError(inner.errno, inner.strerror or str(inner), str(inner.filename or tmp))
    if isinstance(inner, RuntimeError) and ("inline_container" in str(inner) or "write failed" in str(inner)):
        try:
            full = shutil.disk_usage(tmp.parent).free < (16 << 20)
        except OSError:
            full = False
        if full:
            return OSError(errno.ENOSPC, "disk full", str(tmp))
        return OSError(errno.EIO, f"write failed: {str(inner).splitlines()[0]}", str(tmp))
    return e


def non_finite(model, optimizer, ps: ParallelState | None = None) -> str | None:
    """The name of the first parameter or optimizer state that is not finite (None: all are).
    One host sync (and one all_reduce) for all tensors."""
    ps = ps or ParallelState()
    named = []
    for name, p in model.named_parameters():
        named.append((name, p))
        for k, v in optimizer.state.get(p, {}).items():
            if torch.is_tensor(v) and v.is_floating_point() and v.numel() > 1:
                named.append((f"optimizer state {k} of {name}", v))
    if not named:
        return None
    local = [(t.to_local() if is_sharded(t) else t).detach() for _, t in named]
    device = local[0].device
    ok = torch.stack([torch.isfinite(t).all().to(device) for t in local]).to(torch.int32)
    if ps.distributed and dist.get_backend() == "gloo":
        ok = ok.cpu()
    if ps.distributed:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    ok = ok.cpu()  # the one host sync
    if bool(ok.all()):
        return None
    return next(n for (n, _), f in zip(named, ok.tolist()) if not f)


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


def _empty_optim_state(model, optimizer, path: Path, ps: ParallelState) -> tuple[dict, dict]:
    """Optimizer state is created lazily by torch; build empty tensors of the right local shape
    for every entry the checkpoint has, so DCP can fill them. Returns (what DCP loads into,
    the tensors the optimizer keeps where they differ: FSDP-sharded expert states, whose
    global view DCP fills in place)."""
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    params = _params(model)
    out, keep = {}, {}
    for key, md in meta.items():
        if not key.startswith("optim."):
            continue
        name, k = key[len("optim."):].rsplit(".", 1)
        if name not in params:
            raise ValueError(f"checkpoint {path}: optimizer state for unknown parameter {name}")
        p = params[name]
        shape = tuple(md.size)
        dtype = getattr(md.properties, "dtype", None) or torch.float32
        if is_sharded(p) and shape == _global_shape(p, ps):  # FSDP2 parameter: state sharded like it
            keep[key] = torch.zeros_like(p, dtype=dtype)
            out[key] = _global(keep[key], is_expert(p), ps)
            continue
        # a per-expert state (grads.is_expert_state) of the global [E, ...] shape: this rank's rows
        local_shape = (p.shape[0], *shape[1:]) if p.dim() > 0 else shape
        per_expert = (is_expert(p) and len(shape) == p.dim() > 0 and shape[0] == _global_shape(p, ps)[0]
                      and is_expert_state(p, torch.empty(local_shape, device="meta")))
        if is_sharded(p) and len(shape) == p.dim():  # Adafactor's factored statistics of an FSDP2 parameter
            keep[key] = factored_zeros(p, local_shape if per_expert else shape, dtype)
            out[key] = _global(keep[key], per_expert, ps)
            continue
        local = torch.empty(local_shape if per_expert else shape, dtype=dtype, device=p.device)
        out[key] = _global(local, per_expert, ps)
    return out, keep


def check(path: Path, verify: bool = True, trust: bool = False) -> None:
    """Before anything of `path` is read: its manifest verified (with verify), and a checkpoint
    without one refused unless trusted (DCP's .metadata is a pickle). Raises ManifestError."""
    path = Path(path)
    if not has_manifest(path):
        if not trust:
            raise ManifestError(f"checkpoint {path}: no manifest.json, so nothing vouches for its files (DCP's "
                                f".metadata is a pickle and loading it can run code); pass --trust-checkpoint if "
                                f"you wrote it yourself")
        return
    if verify:
        verify_manifest(path)


def load(path: Path, model, optimizer, scheduler, ps: ParallelState | None = None, verify: bool = True,
         trust: bool = False) -> dict:
    ps = ps or ParallelState()
    if not (path / "trainer_state.json").is_file() or not (path / ".metadata").is_file():
        raise ValueError(f"checkpoint {path}: incomplete (no trainer_state.json or DCP .metadata)")
    check(path, verify, trust)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        if not isinstance(state, dict) or "step" not in state or "scheduler" not in state:
            raise ValueError("no step or scheduler")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / 'trainer_state.json'}: not a valid trainer state ({e})") from None
    try:
        return _load(path, state, model, optimizer, scheduler, ps)
    except BaseException as e:  # noqa: BLE001  (DCP's CheckpointException is a BaseException)
        from ..utils.cli import Interrupted, _unwrap

        inner = _unwrap(e)
        if isinstance(e, (KeyboardInterrupt, Interrupted, SystemExit)) or isinstance(inner, ValueError):
            raise
        msg = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
        short = _short_file(path)
        where = f"{short}: truncated or missing" if short else f"checkpoint {path}: cannot be read"
        raise ValueError(f"{where} ({type(inner).__name__}: {msg})") from None


def _short_file(path: Path) -> Path | None:
    """The DCP data file that is missing or shorter than its metadata says, if any."""
    try:
        md = dcp.FileSystemReader(str(path)).read_metadata()
        for info in md.storage_data.values():
            f = path / info.relative_path
            if not f.is_file() or f.stat().st_size < info.offset + info.length:
                return f
    except Exception:  # noqa: BLE001
        pass
    return None


def _physical_placement(path: Path, state: dict, model) -> list[list[int]] | None:
    """The placement a checkpoint written before experts were saved in logical order holds its
    experts in (None: logical order). Such a checkpoint loads only where the placement can be
    set again: with expert parallelism."""
    placement = state.get("placement") or []
    if state.get("expert_order") == "logical" or all(p == sorted(p) for p in placement):
        return None
    if not expert_parallel_layers(model):
        raise ValueError(f"checkpoint {path}: experts saved in the physical slot order of a balanced run "
                         f"(an older format); resume it with --ep {state.get('ep')}, save once, then at any ep")
    return placement


def _load(path: Path, state: dict, model, optimizer, scheduler, ps: ParallelState) -> dict:
    physical = _physical_placement(path, state, model)
    for i, (_, layer) in enumerate(expert_parallel_layers(model)):  # the layout the checkpoint holds
        layer.dispatcher.placement = torch.tensor(physical[i] if physical else list(range(layer.num_experts)))
    optim_sd, keep = _empty_optim_state(model, optimizer, path, ps)
    sd = {**_model_state(model, ps), **optim_sd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=str(path))
    params = _params(model)
    with torch.no_grad():  # DCP loads in place; copy only where a view did not share storage
        for k, v in model.state_dict().items():
            loaded = sd[f"model.{k}"]
            dst = v.to_local() if is_sharded(v) else v
            src = loaded.to_local() if is_sharded(loaded) else loaded
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
    for key, v in sd.items():
        if key.startswith("optim."):
            name, k = key[len("optim."):].rsplit(".", 1)
            p = params[name]
            if key in keep:
                v = keep[key]  # the FSDP DTensor whose storage DCP filled
            optimizer.state[p][k] = v if is_sharded(p) else (v.to_local() if is_sharded(v) else v)
    scheduler.load_state_dict(state.pop("scheduler"))
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # param_groups are not in DCP: the scheduled lr comes from the scheduler
    bad = non_finite(model, optimizer, ps)
    if bad is not None:
        raise ValueError(f"checkpoint {path}: {bad} is not finite")
    rng_file = path / f"rng_rank{ps.rank:05d}.pt"
    if (state.get("world"), state.get("ep")) == (ps.world, ps.ep) and rng_file.is_file():
        try:  # same layout: exact RNG continuation
            rng = torch.load(rng_file, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{rng_file}: cannot be read ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return state
