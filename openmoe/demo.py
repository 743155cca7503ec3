"""`make demo`: a tiny OpenMoE end to end on CPU, in a couple of minutes.

Builds a small local corpus, trains a BPE tokenizer on it, trains a tiny OpenMoE (configs/tiny),
saves an HF folder, reloads it with AutoModelForCausalLM / AutoTokenizer and generates.
The training loop here is deliberately minimal; train.py is the real trainer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a small bird", "the teacher"]
VERBS = ["sees", "likes", "follows", "paints", "finds", "helps", "remembers"]
OBJECTS = ["the red ball", "a green tree", "the river", "an open door", "the tall tower", "a quiet song"]
PLACES = ["in the park", "at night", "near the sea", "after school", "in the garden", "on monday"]


def build_corpus(path: Path, n_docs: int = 600, seed: int = 0) -> None:
    """RedPajama-style jsonl ({"text": ...}) of short templated stories."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            sents = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
                     for _ in range(rng.randint(2, 5))]
            f.write(json.dumps({"text": " ".join(sents)}) + "\n")


def train_tokenizer(corpus: Path, vocab_size: int):
    """BPE with OpenMoE's special ids: <pad> 0 (also the BOS, prepended), </s> 1, <unk> 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"])
    texts = [json.loads(line)["text"] for line in open(corpus)]
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<pad> $A", special_tokens=[("<pad>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", bos_token="<pad>", padding_side="left")


def packed_batches(ids: list[int], seq: int, batch: int, seed: int):
    n = (len(ids) - 1) // seq
    data = torch.tensor(ids[: n * seq + 1])
    g = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(n, generator=g).split(batch):
            if len(idx) == batch:
                yield torch.stack([data[i * seq:(i + 1) * seq] for i in idx.tolist()])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)

    import openmoe  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from openmoe import OpenMoeConfig, OpenMoeForCausalLM

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.jsonl"
    build_corpus(corpus)
    cfg = OpenMoeConfig.from_pretrained(Path(__file__).resolve().parent.parent / "configs" / "tiny")
    tokenizer = train_tokenizer(corpus, cfg.vocab_size)
    cfg.vocab_size = len(tokenizer)
    print(f"corpus: {corpus} | tokenizer: {len(tokenizer)} pieces")

    ids = []
    for line in open(corpus):
        ids += tokenizer(json.loads(line)["text"])["input_ids"] + [tokenizer.eos_token_id]
    model = OpenMoeForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {cfg.num_experts} experts, top-{cfg.num_experts_per_tok}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    model.train()
    t0 = time.time()
    for step, batch in zip(range(args.steps), packed_batches(ids, args.seq, args.batch, seed=0)):
        o = model(batch, labels=batch)
        o.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == args.steps - 1:
            tps = (step + 1) * batch.numel() / (time.time() - t0)
            print(f"step {step:4d} loss {o.lm_loss.item():.3f} aux {o.aux_loss.item():.3f} "
                  f"z {o.router_z_loss.item():.3f} drop {o.dropped_fraction.mean().item():.3f} "
                  f"tok/s {tps:.0f}", flush=True)

    folder = out / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"saved: {folder}")

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = "the cat sees"
    enc = tok(prompt, return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_token_id)
    text = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"reloaded with AutoModelForCausalLM ({type(model).__name__}); generate:")
    print(f"  {prompt!r} -> {text!r}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
