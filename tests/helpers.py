"""Small test fixtures shared by several test files: a templated corpus and a BPE tokenizer
with OpenMoE's special ids (<pad> 0, </s> 1, <unk> 2)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from openmoe import OpenMoeConfig

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a small bird", "the teacher"]
VERBS = ["sees", "likes", "follows", "paints", "finds", "helps", "remembers"]
OBJECTS = ["the red ball", "a green tree", "the river", "an open door", "the tall tower", "a quiet song"]


def build_corpus(path: Path, n_docs: int = 60, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            sents = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                     for _ in range(rng.randint(2, 5))]
            f.write(json.dumps({"text": " ".join(sents)}) + "\n")


def bpe_tokenizer(corpus: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"])
    tok.train_from_iterator([json.loads(line)["text"] for line in open(corpus)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def tiny_config(**overrides) -> OpenMoeConfig:
    """4 layers (MoE at 1 and 3), 4 experts, head_dim 16 with 4 heads (64 != hidden 32)."""
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
              num_attention_heads=4, head_dim=16, num_experts=4, num_experts_per_tok=2,
              moe_layer_interval=2, max_position_embeddings=64, router_group_size=4096)
    kw.update(overrides)
    return OpenMoeConfig(**kw)


def make_run_setup(tmp_path):
    """A tiny model config folder, a tokenizer and two local sources; returns CLI override args."""
    from openmoe.demo import write_jsonl
    from openmoe.data import train_sentencepiece

    code = [f"def f{i}(x):\n    return x + {i}\n" for i in range(40)]
    prose = [f"The river number {i} runs to the sea, and the sea is wide." for i in range(40)]
    write_jsonl(tmp_path / "rp.jsonl", "text", prose)
    write_jsonl(tmp_path / "stack.jsonl", "content", code)
    spm = train_sentencepiece(code + prose, str(tmp_path / "spm"), 320)
    cfg = OpenMoeConfig(vocab_size=384, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=2, head_dim=16, num_experts=4, moe_layer_interval=2,
                        max_position_embeddings=64)
    cfg.save_pretrained(tmp_path / "model_cfg")
    data = [{"name": "rp", "path": str(tmp_path / "rp.jsonl"), "weight": 0.5},
            {"name": "stack", "path": str(tmp_path / "stack.jsonl"), "text_field": "content", "weight": 0.5}]
    return ["--model", str(tmp_path / "model_cfg"), "--tokenizer", spm, "--data", json.dumps(data),
            "--seq_len", "32", "--batch_size", "4", "--steps", "6", "--lr", "3e-3", "--warmup_steps", "2",
            "--log_every", "1", "--save_every", "2", "--precision", "fp32", "--tensorboard", "false",
            "--peak_tflops", "1.0", "--out_dir", str(tmp_path / "run")]


def free_port() -> int:
    """A TCP port free on localhost now (for a test's MASTER_PORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compare_and_step(res: dict, ref, ref_opt, ref_loss, model, opt, loss, ps, max_norm: float = 0.05) -> None:
    """One step of a distributed-vs-one-process test, after the caller has compared gradients:
    record the largest gap between the ranks' mean loss and the reference loss, and between the
    two clipped gradient norms (the distributed one from `openmoe.parallel.clip_grad_norm`), then
    step and zero both optimizers."""
    import torch
    import torch.distributed as dist

    from openmoe.parallel import clip_grad_norm

    world = dist.get_world_size()
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    res["loss"] = max(res["loss"], abs(float(sum(losses) / world - ref_loss)))
    n_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    n_dist = clip_grad_norm(model, max_norm, ps)
    res["norm"] = max(res["norm"], abs(float(n_ref - n_dist)))
    for o in (ref_opt, opt):
        o.step()
        o.zero_grad()


def arg(args: list[str], key: str) -> str:
    """The value after `key` in a list of CLI flags."""
    return args[args.index(key) + 1]


def read_metrics(out_dir) -> list[dict]:
    """Every record of a run's metrics.jsonl (logged steps, and balancer moves when balancing)."""
    return [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]


def run_train(args: list[str], env: dict, nproc: int | None = None):
    """train.py in a subprocess (under torchrun with `nproc` ranks when given); fails the test
    with the end of stderr if it does not exit 0."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    launch = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    r = subprocess.run([sys.executable, *launch, str(root / "train.py"), *args], capture_output=True, text=True,
                       env=env, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def assert_same_weights(ma, mb) -> None:
    """Two models' parameters after the same training run done two ways (e.g. one process vs
    torchrun). Adam divides by sqrt(v): elements with ~0 gradients (lm_head rows of unseen tokens,
    single elements of seen rows) have their summation-order noise turned into updates of up to
    ~lr: seen 4e-4 on one lm_head row after 4 steps at 2 and 4 ranks, while the gradients agree to
    1e-5. So: nearly every element within 1e-4, none beyond 1e-3. A wrong gradient scale shows in
    the runs' grad_norm; Adam itself is scale-invariant."""
    for (n, pa), (_, pb) in zip(ma.named_parameters(), mb.named_parameters()):
        diff = (pa - pb).abs()
        assert pa.shape == pb.shape and diff.max() < 1e-3 and (diff > 1e-4).float().mean() < 1e-3, \
            (n, diff.max(), int((diff > 1e-4).sum()))


def join_gloo(rank: int, port: int, world: int) -> None:
    """A spawned test worker joins the gloo group on localhost, one thread per rank (the ranks
    share the machine's few cores)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def seeded_twins(cfg, ps, **parallelize_kw):
    """(one-process reference, its parallelised copy): the same seed-0 weights, training mode."""
    import copy

    import torch

    from openmoe import OpenMoeForCausalLM
    from openmoe.parallel import parallelize

    torch.manual_seed(0)
    ref = OpenMoeForCausalLM(cfg).train()
    return ref, parallelize(copy.deepcopy(ref), ps, **parallelize_kw)


def seeded_ep_model(ps, **cfg_overrides):
    """(cfg, the seed-0 tiny model parallelised over ps): the set-up of the balancer tests."""
    cfg = tiny_config(**cfg_overrides)
    return cfg, seeded_twins(cfg, ps)[1]
