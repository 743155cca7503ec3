"""`make demo`: a tiny OpenMoE end to end on CPU, from files already on this machine.

1. corpus: the Python standard library's sources as a Stack-like part (`content`), and English
   text that ships with Python and the OS (pydoc's topic help, license texts) as a
   RedPajama-like part (`text`), written as jsonl;
2. a sentencepiece tokenizer trained on it (pad/BOS 0, eos 1, unk 2, as umT5);
3. train.py's trainer on configs/train/tiny_demo.yaml (a few hundred steps, 50/50 mixture);
4. the exported HF folder reloaded with AutoModelForCausalLM / AutoTokenizer, and samples.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stack_like(max_files: int = 400, max_bytes: int = 4_000_000) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for f in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "test" in f.parts[-2:][0] or f.stat().st_size > 60_000:
            continue
        text = f.read_text(encoding="utf-8", errors="ignore")
        docs.append(text)
        total += len(text)
        if len(docs) >= max_files or total >= max_bytes:
            break
    return docs


def redpajama_like(max_bytes: int = 4_000_000) -> list[str]:
    docs = []
    try:
        from pydoc_data.topics import topics  # the English text of Python's help()

        docs += [topics[k] for k in sorted(topics)]
    except ImportError:
        pass
    for f in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(f):
            docs.append(Path(f).read_text(encoding="utf-8", errors="ignore"))
    out, total = [], 0
    for d in docs:
        if d.strip():
            out.append(d)
            total += len(d)
        if total >= max_bytes:
            break
    if not out:
        raise SystemExit("demo: found no English text on this machine (pydoc topics, common-licenses)")
    return out


def write_jsonl(path: Path, field: str, docs: list[str]) -> None:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({field: d}) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--steps", type=int, default=None, help="override the YAML's steps")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import openmoe  # noqa: F401  (registers the Auto classes)
    from openmoe.data import train_sentencepiece
    from openmoe.generation import clean_output, encode_prompts
    from openmoe.training import Trainer, load_config

    out = Path(args.out)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    code, prose = stack_like(), redpajama_like()
    write_jsonl(out / "corpus" / "stack.jsonl", "content", code)
    write_jsonl(out / "corpus" / "redpajama.jsonl", "text", prose)
    print(f"[1/4] corpus: {len(code)} Python files ({sum(map(len, code)) / 1e6:.1f} MB), "
          f"{len(prose)} English documents ({sum(map(len, prose)) / 1e6:.1f} MB) in {out / 'corpus'}")

    spm_path = train_sentencepiece(code[:200] + prose[:300], str(out / "tokenizer" / "spm"), 1024)
    print(f"[2/4] tokenizer: {spm_path} (sentencepiece unigram, 1024 pieces)")

    overrides = ["--out_dir", str(out / "train"), "--tokenizer", spm_path, "--data", json.dumps([
        {"name": "redpajama", "path": str(out / "corpus" / "redpajama.jsonl"), "text_field": "text", "weight": 0.5},
        {"name": "stack", "path": str(out / "corpus" / "stack.jsonl"), "text_field": "content", "weight": 0.5}])]
    if args.steps:
        overrides += ["--steps", str(args.steps)]
    cfg = load_config(str(ROOT / "configs" / "train" / "tiny_demo.yaml"), overrides)
    shutil.rmtree(out / "train", ignore_errors=True)  # the demo always starts fresh
    print(f"[3/4] training configs/train/tiny_demo.yaml for {cfg.steps} steps "
          f"({cfg.batch_size} x {cfg.seq_len} tokens per step)")
    trainer = Trainer(cfg)
    trainer.setup()
    final = trainer.train()
    rows = [json.loads(line) for line in open(out / "train" / "metrics.jsonl")]
    losses = [r["lm_loss"] for r in rows if "lm_loss" in r]  # step rows (not eval or balancer rows)
    print(f"      lm_loss {losses[0]:.3f} (step 1) -> {losses[-1]:.3f} (mean of the last {cfg.log_every} steps)")
    try:
        from .plot import plot_run

        print(f"      plots: {', '.join(p.name for p in plot_run(out / 'train'))} in {out / 'train' / 'plots'}")
    except ValueError as e:  # matplotlib not installed: the demo goes on without plots
        print(f"      plots: skipped ({e})")

    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    print(f"[4/4] reloaded {final} with AutoModelForCausalLM ({type(model).__name__}) and AutoTokenizer")
    torch.manual_seed(0)
    for prompt in ["def", "The"]:
        enc = encode_prompts(tok, [prompt])
        gen = model.generate(**enc, max_new_tokens=40, min_new_tokens=20, do_sample=True, top_k=10,
                             temperature=0.7, repetition_penalty=1.2, pad_token_id=0, eos_token_id=1)
        text = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"--- sample for {prompt!r}:\n{prompt}{clean_output(text)}\n")


if __name__ == "__main__":
    main()
