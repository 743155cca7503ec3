"""Convert an original T5X/Jax OpenMoE checkpoint into an HF model folder.

    python convert_jax_checkpoint.py CHECKPOINT_DIR OUTPUT_DIR [--config base|8b|34b|PATH]
        [--tokenizer umt5.spm] [--dtype float32|bfloat16] [--max-shard-size 5GB]

CHECKPOINT_DIR is a `checkpoint_<step>` folder (msgpack `checkpoint` + zarr arrays). Without
--config the config is inferred from the tensor shapes; with it, every mismatch is named. The
output (safetensors shards + index, config.json, generation_config.json, modeling code, and the
tokenizer with its chat template when --tokenizer is given) appears only once complete.
Bad input, a full disk, a read error: a one-line error naming the parameter and file, exit
status 2, no output (--debug adds the traceback). SIGTERM/SIGINT remove the temporary folder; a
temporary folder left by a SIGKILLed run is removed by the next run.
"""

from __future__ import annotations

import argparse
import os
import sys

PROG = "convert_jax_checkpoint.py"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description="T5X/Jax OpenMoE checkpoint -> HF model folder")
    ap.add_argument("checkpoint_dir", help="the checkpoint_<step> folder (or its msgpack 'checkpoint' file)")
    ap.add_argument("output_dir", help="folder to create (must not exist, or be empty)")
    ap.add_argument("--config", help="base, 8b, 34b, or a config.json / folder (default: infer from shapes)")
    ap.add_argument("--tokenizer", help="umT5 sentencepiece .model to save beside the weights")
    ap.add_argument("--tokenizer-extra-ids", type=int, default=300,
                    help="sentinel tokens appended to the sentencepiece vocab (umT5: 300)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, 2GiB (default 5GB)")
    ap.add_argument("--head-dim", type=int, help="head_dim when inferring a config that is not a "
                    "shipped size (shapes give heads x head_dim only); default 64")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                    help="threads inflating the chunks of one array")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    if args.head_dim is not None and args.head_dim < 1:
        ap.error("--head-dim must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from openmoe.checkpoint import CheckpointError, convert
    from openmoe.utils.cli import cli_errors

    # CheckpointError, OSError (disk full named ENOSPC), bad values: one line, exit 2; SIGTERM and
    # SIGINT: the temporary output folder is removed (output_folder's cleanup runs), exit 128 + signal
    with cli_errors(PROG, debug=args.debug, expected=(CheckpointError,)) as status:
        out = convert(args.checkpoint_dir, args.output_dir, config=args.config, dtype=args.dtype,
                      max_shard_size=args.max_shard_size, tokenizer=args.tokenizer,
                      tokenizer_extra_ids=args.tokenizer_extra_ids, head_dim=args.head_dim,
                      workers=args.workers, progress=False if args.no_progress else None)
        print(f"wrote {out}")
    return status.code


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
