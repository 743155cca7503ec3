"""Plots of a training run from its metrics.jsonl (matplotlib, the `plot` extra).

    python -m openmoe.plot RUN_DIR [--out DIR]

writes into RUN_DIR/plots (or --out): loss.png (loss, lm_loss and every eval loss), lr.png,
speed.png (tokens/s and MFU), drop_rate.png (per MoE layer) and expert_load.png (one heat map
per MoE layer: tokens routed to each expert over steps, as a multiple of that step's mean, so 1.0 is a
perfectly balanced expert). Each file is written to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (RUN_DIR is a train.py out_dir)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path} line {n}: not JSON") from None
    if not rows:
        raise ValueError(f"{path}: no rows yet")
    return rows


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _lines(plt, rows, keys, title, path, ylog=False) -> bool:
    present = [k for k in keys if _series(rows, k)[0]]
    if not present:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in present:
        ax.plot(*_series(rows, k), label=k)
    ax.set(xlabel="step", title=title)
    if ylog:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return True


def expert_load(rows: list[dict], key: str = "tokens_per_expert"):
    """(steps, [layer][expert][step] load / mean load) from the rows that carry per-expert counts."""
    rows = [r for r in rows if r.get(key)]
    if not rows:
        return [], []
    n_layers = len(rows[0][key])
    maps = []
    for layer in range(n_layers):
        cols = []
        for r in rows:
            counts = r[key][layer]
            mean = sum(counts) / len(counts) if counts and sum(counts) else 1.0
            cols.append([c / mean for c in counts])
        maps.append([list(e) for e in zip(*cols)])  # [expert][step]
    return [r["step"] for r in rows], maps


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("matplotlib is not installed: pip install matplotlib (or openmoe[plot])") from None
    rows = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval") and k.endswith("loss")})
    for name, keys, title, ylog in (
            ("loss", ["loss", "lm_loss", *eval_keys], "loss", False),
            ("lr", ["lr"], "learning rate", False),
            ("speed", ["tokens_per_s", "mfu"], "tokens/s and MFU", True)):
        if _lines(plt, rows, keys, title, out / f"{name}.png", ylog):
            written.append(out / f"{name}.png")
    drop = [r for r in rows if r.get("drop_rate")]
    if drop:
        fig, ax = plt.subplots(figsize=(7, 4))
        for layer in range(len(drop[0]["drop_rate"])):
            ax.plot([r["step"] for r in drop], [r["drop_rate"][layer] for r in drop], label=f"MoE layer {layer}")
        ax.set(xlabel="step", ylabel="dropped fraction", title="capacity drops")
        ax.legend(fontsize=8)
        _save(fig, out / "drop_rate.png")
        plt.close(fig)
        written.append(out / "drop_rate.png")
    # the router's choices before capacity where the run logged them, else the kept counts
    routed = any(r.get("routed_per_expert") for r in rows)
    steps, maps = expert_load(rows, "routed_per_expert" if routed else "tokens_per_expert")
    if maps:
        fig, axes = plt.subplots(len(maps), 1, figsize=(8, 1.2 + 1.6 * len(maps)), squeeze=False)
        for layer, (ax, grid) in enumerate(zip(axes[:, 0], maps)):
            im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest",
                           extent=(steps[0] - 0.5, steps[-1] + 0.5, len(grid) - 0.5, -0.5))
            ax.set(ylabel=f"layer {layer}\nexpert")
            fig.colorbar(im, ax=ax, label="load / mean")
        axes[-1, 0].set_xlabel("step")
        fig.suptitle("expert load per MoE layer")
        _save(fig, out / "expert_load.png")
        plt.close(fig)
        written.append(out / "expert_load.png")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="openmoe.plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--out", help="folder for the PNGs (default: RUN_DIR/plots)")
    args = ap.parse_args(argv)
    try:
        for path in plot_run(args.run_dir, args.out):
            print(path)
    except (ValueError, OSError) as e:
        print(f"openmoe.plot: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
