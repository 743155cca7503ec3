"""Pre-train or fine-tune OpenMoE.

    python train.py --config configs/train/tiny_demo.yaml [--key value ...] [--resume]
    python train.py --config ... --plan [--device_memory 80GB]   # memory plan per rank; loads nothing
    python train.py --init_from DIR --eval_data '[...]' --eval_only  # eval loss/ppl per source, no training

Every key of the YAML (see openmoe/training/config.py: TrainConfig) can be overridden with
`--key value`, model config fields with `--model_overrides.NAME value`.

Errors: one line on stderr naming the file, key or flag, exit status 2 (3: training diverged,
the last good checkpoint kept); --debug adds the traceback. SIGTERM/SIGINT remove temporary
folders before exiting (128 + signal).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    from openmoe.training.config import keys_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="config keys (YAML or --key value; from TrainConfig):\n" + keys_text())
    ap.add_argument("--config", help="training YAML")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in out_dir")
    ap.add_argument("--plan", nargs="?", const="true", default=None,
                    help="print the per-rank memory plan of this run and exit (same as --plan true)")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the sha256 check of the checkpoint resumed from and of init_from (manifest.json)")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="resume from a checkpoint without manifest.json (its DCP .metadata is a pickle: only "
                         "checkpoints you wrote yourself)")
    ap.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    ap.add_argument("--eval_only", nargs="?", const="true", default=None,
                    help="evaluate init_from (or the checkpoint with --resume) on eval_data: print and write "
                         "eval/<source>/loss and /ppl to metrics.jsonl, no training (same as --eval_only true)")
    args, rest = ap.parse_known_args(argv)
    if args.plan is not None:
        rest = rest + ["--plan", args.plan]
    if args.eval_only is not None:
        rest = rest + ["--eval_only", args.eval_only]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")  # its parse errors come back as one DataError line

    from openmoe.data import DataError
    from openmoe.training import Trainer, TrainingDiverged, load_config
    from openmoe.utils.cli import cli_errors

    trainer = None
    with cli_errors("train.py", debug=args.debug, expected=(DataError,)) as status:
        try:
            cfg = load_config(args.config, rest)
            if cfg.plan:  # from the model config on the meta device: no weights, no data
                from openmoe.planner.cli import plan_text
                from openmoe.training.config import model_config

                print(plan_text(cfg, model_config(cfg))[0])
                return 0
            trainer = Trainer(cfg, resume=args.resume, verify=not args.no_verify,
                              trust_checkpoint=args.trust_checkpoint)
            trainer.setup()
            if cfg.eval_only:
                trainer.eval_only()
            else:
                trainer.train()
            _close_process_group()
        except TrainingDiverged as e:
            print(f"train.py: {e}", file=sys.stderr)
            status.code = 3
        finally:
            if trainer is not None:
                trainer.close()
    return status.code


def _close_process_group() -> None:
    """Every rank done, then tear the process group down explicitly: left to interpreter exit,
    gloo's threads are destroyed in no particular order and a rank can abort ("terminate called
    without an active exception", exit -6: seen at 4 ranks with FSDP2)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
