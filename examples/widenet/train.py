"""Train a WideNet (shared attention + shared MoE across blocks) on a small image data set.

Single process:
    python examples/widenet/train.py --data digits --epochs 30
Expert parallel over 2 CPU processes (gloo; EP = world size, experts split across ranks):
    torchrun --nproc_per_node 2 examples/widenet/train.py --data digits --epochs 30

--data: digits (scikit-learn's 8x8 handwritten digits, 1797 images, fixed 80/20 split),
        folder:PATH (one subfolder per class, optional PATH/train and PATH/test; images need
        Pillow, .npy arrays do not), cifar10:PATH (the python pickle batches, data_batch_1..5
        and test_batch, in PATH).

Distributed recipe (see openmoe.parallel.ddp): every rank builds the model from the same seed,
expert_parallel(model) keeps rank r's E/world experts, ddp_ignore_experts(model) keeps them out
of DDP's all-reduce, then DistributedDataParallel wraps it. Every global batch is cut into
world slices, one per rank. The MoE forward is collective (all_to_all), so every rank runs the
same number of forward calls, evaluation included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

_HERE = str(Path(__file__).resolve().parent)
_added = _HERE not in sys.path  # run as a script it is already sys.path[0]
if _added:
    sys.path.insert(0, _HERE)
try:
    from widenet import WideNet
finally:  # imported (tests): leave no trace that would shadow the repository's own train.py
    if _added:
        sys.path.remove(_HERE)


# ---------------------------------------------------------------------------------------------
# Data: float32 images [N, C, H, W] (normalized) and int64 labels, for train and test


def fixed_split(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The same train/test split whatever --seed says."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


def load_digits_data():
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise SystemExit("--data digits needs scikit-learn: pip install scikit-learn") from err
    d = load_digits()  # shipped with scikit-learn, no download
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8]
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = fixed_split(len(y))
    return (x[tr], y[tr]), (x[te], y[te]), 10


def _read_image(path: Path, size: int) -> np.ndarray:
    if path.suffix == ".npy":
        a = np.load(path).astype(np.float32)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # HW or HWC -> CHW
        t = torch.from_numpy(a)[None]
        if a.max() > 1.0:
            t = t / 255.0
        return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0].numpy()
    try:
        from PIL import Image
    except ImportError as err:
        raise SystemExit(f"reading {path} needs Pillow (pip install pillow), or store images as .npy") from err
    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size))
        return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".webp", ".npy"}


def _read_folder(root: Path, size: int, classes: list[str] | None = None):
    classes = classes or sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"--data folder:{root}: no class subfolders in {root}")
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()) if (root / name).is_dir() else []:
            if f.suffix.lower() in IMAGE_SUFFIXES:
                xs.append(_read_image(f, size))
                ys.append(label)
    if not xs:
        raise SystemExit(f"--data folder:{root}: no images ({sorted(IMAGE_SUFFIXES)}) in its class subfolders")
    channels = {a.shape[0] for a in xs}
    if len(channels) > 1:  # mixed gray / color .npy files: make all RGB
        xs = [np.repeat(a, 3, 0) if a.shape[0] == 1 else a for a in xs]
    return torch.tensor(np.stack(xs)), torch.tensor(ys, dtype=torch.long), classes


def load_folder_data(path: str, size: int):
    root = Path(path)
    if not root.is_dir():
        raise SystemExit(f"--data folder:{path}: {path} is not a directory")
    if (root / "train").is_dir() and (root / "test").is_dir():
        xtr, ytr, classes = _read_folder(root / "train", size)
        xte, yte, _ = _read_folder(root / "test", size, classes)
        return (xtr, ytr), (xte, yte), len(classes)
    x, y, classes = _read_folder(root, size)
    tr, te = fixed_split(len(y))
    return (x[tr], y[tr]), (x[te], y[te]), len(classes)


def load_cifar10_data(path: str):
    root = Path(path)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise SystemExit(f"--data cifar10:{path}: missing {', '.join(str(root / n) for n in missing)} "
                         "(expected the extracted cifar-10-batches-py folder)")

    def read(name):
        with open(root / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = torch.tensor(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32), dtype=torch.float32)
        return x / 255.0, torch.tensor(d[b"labels"], dtype=torch.long)

    parts = [read(n) for n in names[:5]]
    xtr, ytr = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return (xtr, ytr), read("test_batch"), 10


def load_data(spec: str, image_size: int | None):
    if spec == "digits":
        train, test, classes = load_digits_data()
    elif spec.startswith("folder:"):
        train, test, classes = load_folder_data(spec[len("folder:"):], image_size or 32)
    elif spec.startswith("cifar10:"):
        train, test, classes = load_cifar10_data(spec[len("cifar10:"):])
    else:
        raise SystemExit(f"--data {spec!r}: choose digits, folder:PATH or cifar10:PATH")
    # per-channel standardization with the training set's statistics
    mean = train[0].mean(dim=(0, 2, 3), keepdim=True)
    std = train[0].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    norm = lambda xy: ((xy[0] - mean) / std, xy[1])  # noqa: E731
    return norm(train), norm(test), classes


# ---------------------------------------------------------------------------------------------
# Distributed helpers


def init_distributed() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    dist.init_process_group("gloo")  # MASTER_ADDR/PORT, RANK, WORLD_SIZE from torchrun
    return dist.get_rank(), dist.get_world_size()


def all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def global_batches(n: int, batch_size: int, perm: torch.Tensor | None = None):
    idx = perm if perm is not None else torch.arange(n)
    return [idx[i:i + batch_size] for i in range(0, n, batch_size)]


def full_state_dict(model: torch.nn.Module, world: int) -> dict:
    """The state dict of the unsharded model: expert-parallel weights ([E/world, ...] on each rank,
    rank-major) are all-gathered back to [E, ...]. Collective: call on every rank."""
    from openmoe.parallel.expert_parallel import gather_experts
    from openmoe.parallel.grads import is_expert

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if world > 1:
        for name, p in model.named_parameters():
            if is_expert(p):
                state[name] = gather_experts(p.detach(), dist.group.WORLD)
    return state


# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, x, y, batch_size, rank, world) -> float:
    """Accuracy over the whole test set. Every rank takes its slice of each global batch and runs
    the same number of forwards (the expert-parallel MoE is collective); a rank whose slice is
    empty runs a throw-away sample."""
    model.eval()
    correct = torch.zeros(2, dtype=torch.long)  # [correct, seen]
    for idx in global_batches(len(y), batch_size):
        mine = idx[rank::world]
        if len(mine) == 0:
            model(x[:1])
            continue
        logits = model(x[mine])[0]
        correct += torch.tensor([(logits.argmax(-1) == y[mine]).sum().item(), len(mine)])
    correct = all_sum(correct, world)
    model.train()
    return correct[0].item() / max(correct[1].item(), 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="digits | folder:PATH | cifar10:PATH")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split over ranks)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=int, default=4, help="expert intermediate size = ratio * hidden")
    p.add_argument("--patch-size", type=int, default=None, help="default 4 (8x8 digits: 4 patches of 4x4)")
    p.add_argument("--image-size", type=int, default=None, help="folder: resize to this (default 32)")
    p.add_argument("--capacity", default="dropless", help="dropless | t5x | colossalai | a capacity factor")
    p.add_argument("--aux-loss", type=float, default=0.01, help="load-balance loss coefficient")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (tiny models run fastest on one; 0 = torch's default)")
    p.add_argument("--out", default=None, help="folder for model.pt (full, unsharded) and metrics.json")
    return p.parse_args(argv)


def build_model(args, xtr: torch.Tensor, num_classes: int, world: int) -> tuple[torch.nn.Module, WideNet, int]:
    """The full WideNet on every rank (same seed), then with world > 1 each rank keeps its slice of
    the experts and DDP wraps the rest. Returns (the model to call, the plain WideNet inside, the
    full model's parameter count)."""
    try:
        capacity = float(args.capacity)
    except ValueError:
        capacity = args.capacity
    torch.manual_seed(args.seed)  # same seed everywhere: every rank builds the same full model
    inner = WideNet(image_size=xtr.shape[-1], patch_size=args.patch_size or 4, in_channels=xtr.shape[1],
                    num_classes=num_classes, hidden=args.hidden, layers=args.layers, heads=args.heads,
                    num_experts=args.experts, top_k=args.top_k, capacity=capacity,
                    intermediate_size=args.mlp_ratio * args.hidden,
                    aux_loss=args.aux_loss, dropout=args.dropout)
    n_params = sum(p.numel() for p in inner.parameters())
    if world == 1:
        return inner, inner, n_params
    from torch.nn.parallel import DistributedDataParallel

    from openmoe.parallel import ddp_ignore_experts, expert_parallel

    if args.experts % world:
        raise SystemExit(f"--experts {args.experts} must be a multiple of the world size {world}")
    expert_parallel(inner)  # rank r keeps experts [r*E/world, (r+1)*E/world)
    ddp_ignore_experts(inner)
    return DistributedDataParallel(inner), inner, n_params


def build_optimizer(inner: torch.nn.Module, args) -> torch.optim.Optimizer:
    def decays(name, p):  # matrices decay; biases, norms, cls token and positions do not
        return p.dim() >= 2 and name not in ("pos_embed", "cls_token")

    decay = [p for n, p in inner.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in inner.named_parameters() if not decays(n, p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)


def lr_schedule(lr: float, total: int, warmup: int):
    def lr_at(step):  # linear warmup, cosine decay to 0
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return lr_at


def train_epoch(model, opt, lr_at, step: int, xtr, ytr, args, epoch: int, rank: int, world: int):
    """One pass over the training set; returns (step, stats [loss sum, aux sum, samples] and the
    experts' load, summed over ranks)."""
    g = torch.Generator().manual_seed(args.seed * 1000 + epoch)  # same shuffle on every rank
    stats = torch.zeros(3, dtype=torch.float64)
    load = torch.zeros(args.experts, dtype=torch.float64)
    for idx in global_batches(len(ytr), args.batch_size, torch.randperm(len(ytr), generator=g)):
        if len(idx) < world:
            continue
        mine = idx[rank::world]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits, aux, load_LE = model(xtr[mine])
        # sum over my samples / global batch * world: DDP's mean over ranks (and the 1/world on
        # expert grads) then gives exactly the gradient of the global batch's mean loss
        ce = F.cross_entropy(logits, ytr[mine], reduction="sum") / len(idx) * world
        loss = ce if aux is None else ce + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        n = len(mine)
        stats += torch.tensor([ce.item() * len(idx) / world, (aux.item() if aux is not None else 0.0) * n, n],
                              dtype=torch.float64)
        load += load_LE.sum(0).double()
    return step, all_sum(stats, world), all_sum(load, world)


def save_run(out_dir: str, inner, args, num_classes: int, acc: float, elapsed: float, history: list,
             rank: int, world: int) -> None:
    state = full_state_dict(inner, world)  # collective
    if rank == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"model": state, "args": vars(args), "num_classes": num_classes,
                    "patch_size": args.patch_size or 4}, out / "model.pt")
        (out / "metrics.json").write_text(json.dumps(
            {"final_test_accuracy": acc, "train_seconds": elapsed, "world": world, "history": history}, indent=1))


def main(argv=None) -> float:
    args = parse_args(argv)
    rank, world = init_distributed()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    log = print if rank == 0 else (lambda *a, **k: None)

    (xtr, ytr), (xte, yte), num_classes = load_data(args.data, args.image_size)
    model, inner, n_params = build_model(args, xtr, num_classes, world)
    log(f"WideNet: {args.layers} blocks sharing 1 attention + 1 MoE ({args.experts} experts, top-{args.top_k}), "
        f"hidden {args.hidden}, patch {args.patch_size or 4}, {n_params:,} parameters; data {args.data}: "
        f"{len(ytr)} train / {len(yte)} test, {num_classes} classes; world {world} (EP={world})")

    opt = build_optimizer(inner, args)
    # drop a last global batch too small to give every rank a sample (same choice on all ranks)
    steps_per_epoch = sum(1 for i in range(0, len(ytr), args.batch_size) if len(ytr) - i >= world)
    total = steps_per_epoch * args.epochs
    lr_at = lr_schedule(args.lr, total, int(args.warmup_epochs * steps_per_epoch))

    step, acc, t0 = 0, 0.0, time.perf_counter()
    history = []
    for epoch in range(1, args.epochs + 1):
        te = time.perf_counter()
        step, stats, load = train_epoch(model, opt, lr_at, step, xtr, ytr, args, epoch, rank, world)
        acc = evaluate(inner, xte, yte, args.eval_batch_size, rank, world)
        frac = load / load.sum().clamp_min(1)
        routed = stats[2].item() * (inner.num_patches + 1) * args.layers * args.top_k  # token-expert assignments
        dropped = 1.0 - load.sum().item() / routed
        history.append({"epoch": epoch, "loss": stats[0].item() / stats[2].item(),
                        "aux": stats[1].item() / stats[2].item(), "test_acc": acc,
                        "load": frac.tolist(), "dropped": dropped})
        log(f"epoch {epoch:3d}/{args.epochs}  loss {history[-1]['loss']:.4f}  aux {history[-1]['aux']:.4f}  "
            f"test acc {acc:.4f}  expert load [{' '.join(f'{f:.2f}' for f in frac.tolist())}]  "
            f"dropped {dropped:.3f}  "
            f"{time.perf_counter() - te:.1f}s", flush=True)

    elapsed = time.perf_counter() - t0
    if args.out:
        save_run(args.out, inner, args, num_classes, acc, elapsed, history, rank, world)
    log(f"training time {elapsed:.1f}s ({world} process{'es' if world > 1 else ''})")
    log(f"final test accuracy {acc:.4f}", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return acc


if __name__ == "__main__":
    main()
