"""Peak memory of real training steps, measured the same way every time (run as a subprocess).

    python tests/planner/measure_step.py '{"flags": [...train.py flags...], "steps": 2}' ...

Each JSON argument is one measurement, run one after the other in this process: build the
Trainer (model, LoRA, optimizer, data) and run `steps` train_step()s. Reported: the growth of
the resident set from just before the Trainer is built to its high-water mark (VmHWM, reset
through /proc/self/clear_refs before each measurement). Started with MALLOC_MMAP_THRESHOLD_
fixed so that freed tensors go back to the OS and the high-water mark follows live tensors
(hence `--cpu_retain_memory false`: the trainer would otherwise keep freed memory mapped).
A warm-up step on a micro model first loads every lazily imported module and kernel.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/helpers.py
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1",
       "OMP_NUM_THREADS": "2", "OPENMOE_NO_TQDM": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _reset_high_water() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def measure(flags: list[str], steps: int) -> int:
    from openmoe.training import Trainer, load_config

    gc.collect()
    base = _status("VmRSS")
    _reset_high_water()
    t = Trainer(load_config(None, flags), log=lambda *a: None)
    t.setup()
    for _ in range(steps):
        t.train_step()
    peak = _status("VmHWM")
    t.close()  # the out_dir lock: the next measurement uses the same folder
    del t
    gc.collect()
    return peak - base


def main(argv: list[str]) -> None:
    import torch

    from helpers import make_run_setup

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        setup = make_run_setup(Path(d)) + ["--cpu_retain_memory", "false"]
        warm = setup + ["--out_dir", f"{d}/warm", "--seq_len", "16", "--batch_size", "2"]
        measure(warm + ["--activation_checkpointing", "true"], 1)
        measure(warm + ["--peft", "lora", "--lora_targets", "attention,mlp,extra_mlp,router,experts"], 1)
        for i, raw in enumerate(argv):
            job = json.loads(raw)
            flags = setup + ["--out_dir", f"{d}/run{i}", "--save_every", "100000"] + job["flags"]
            print(json.dumps({"flags": job["flags"], "peak_bytes": measure(flags, job.get("steps", 2))}), flush=True)


if __name__ == "__main__":
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # re-exec with the allocator settings
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], {**os.environ, **ENV})
    main(sys.argv[1:])
