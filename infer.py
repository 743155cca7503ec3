"""Generate text or chat with an OpenMoE model folder.

    python infer.py MODEL_DIR --prompt "Once upon a time"
    python infer.py MODEL_DIR --chat --system "You are helpful." --prompt "Hi!"
    python infer.py MODEL_DIR --chat                 # interactive multi-turn (stdin a terminal)
    python infer.py MODEL_DIR --input prompts.jsonl --output out.jsonl --batch-size 8   # batches
    python infer.py MODEL_DIR --compile --prompt "..."   # static cache + compiled decode step
    python infer.py BASE_DIR --adapter ADAPTER_DIR --prompt "..."        # with a LoRA adapter (PEFT format)

Works on folders from save_pretrained, train.py, convert_jax_checkpoint.py and the published
ColossalAI-layout checkpoints. Stops on eos and on `</s>` spelled as text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from threading import Thread


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="OpenMoE text generation and chat")
    ap.add_argument("model_dir")
    ap.add_argument("--prompt", help="text to continue (or the user turn with --chat)")
    ap.add_argument("--chat", action="store_true", help="wrap in the OpenMoE chat format")
    ap.add_argument("--system", default=None, help="system prompt for --chat")
    ap.add_argument("--input", help="jsonl of {\"prompt\": ...} (or {\"messages\": [...]} with --chat)")
    ap.add_argument("--output", help="jsonl to write with --input (default: stdout)")
    ap.add_argument("--tokenizer", help="tokenizer folder or name (default: MODEL_DIR)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--do-sample", action="store_true")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--num-beams", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stream", action="store_true", help="print tokens as they come")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--attn-implementation", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    ap.add_argument("--stats", action="store_true", help="print prefill and decode tokens/s")
    ap.add_argument("--adapter", help="LoRA adapter folder (PEFT format, from train.py --peft lora) to apply")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per generate call with --input")
    ap.add_argument("--compile", action="store_true",
                    help="static KV cache and the decode step compiled (fullgraph; CUDA graphs on CUDA); "
                         "the compile is paid once, at a printed warm-up")
    args = ap.parse_args(argv)
    if args.dtype == "float16":
        ap.error("--dtype float16: OpenMoE degrades in fp16 (activations overflow); use bfloat16 or float32")
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    if args.num_beams > 1 and args.stream:
        ap.error("--stream works with greedy or sampling, not beam search")
    if not Path(args.model_dir).is_dir():
        ap.error(f"MODEL_DIR {args.model_dir!r}: no such folder")
    if not (Path(args.model_dir) / "config.json").is_file():
        ap.error(f"MODEL_DIR {args.model_dir!r}: no config.json in it")
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        ap.error(f"--adapter {args.adapter!r}: no adapter_config.json in it")
    if args.input and args.prompt:
        ap.error("give --prompt or --input, not both")
    return args


def load(args):
    import torch
    from transformers import AutoTokenizer

    import openmoe  # noqa: F401  (registers the Auto classes)
    from openmoe import OpenMoeForCausalLM

    tok_dir = args.tokenizer or args.model_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError) as e:
        raise SystemExit(f"infer.py: no usable tokenizer in {tok_dir!r} ({type(e).__name__}); "
                         f"pass --tokenizer DIR") from None
    tokenizer.padding_side = "left"
    dtype = getattr(torch, args.dtype)
    kw = dict(dtype=dtype, attn_implementation=args.attn_implementation)
    if args.device == "auto":
        kw["device_map"] = "auto"
    # OpenMoeForCausalLM also reads the ColossalAI layout (model_type "llama").
    model = OpenMoeForCausalLM.from_pretrained(args.model_dir, **kw).eval()
    if args.adapter:  # LoRA through PEFT, experts on the grouped-GEMM path (openmoe/peft)
        from openmoe.peft import load_adapter

        try:
            load_adapter(model, args.adapter)
        except ValueError as e:
            raise SystemExit(f"infer.py: {e}") from None
        model.eval()
    if args.device == "cuda":
        model = model.to("cuda")
    return model, tokenizer


def generation_kwargs(args, model, tokenizer) -> dict:
    from openmoe.generation import STOP_TEXT

    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, num_beams=args.num_beams,
              repetition_penalty=args.repetition_penalty, eos_token_id=model.config.eos_token_id,
              pad_token_id=model.config.pad_token_id, stop_strings=[STOP_TEXT], tokenizer=tokenizer)
    if args.do_sample:
        kw.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None)
    if args.compile:
        from transformers import CompileConfig

        cc = CompileConfig(fullgraph=True, mode="reduce-overhead" if model.device.type == "cuda" else "default")
        cc._compile_all_devices = True  # generate compiles on accelerators only unless told
        kw.update(cache_implementation="static", compile_config=cc)
    return kw


def warm_up(args, model, tokenizer, text: str) -> float:
    """With --compile: one short generate, so the compile is paid here, once; its seconds."""
    import torch

    from openmoe.generation import encode_prompts

    enc = {k: v.to(model.device) for k, v in encode_prompts(tokenizer, [text]).items()}
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(**enc, **dict(generation_kwargs(args, model, tokenizer), max_new_tokens=2))
    return time.perf_counter() - t


def render(args, tokenizer, prompt: str | None = None, messages: list | None = None) -> str:
    from openmoe.generation import ensure_chat_template

    if not args.chat:
        return prompt
    ensure_chat_template(tokenizer)
    if messages is None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def generate(args, model, tokenizer, texts: list[str], stream_to=None) -> tuple[list[str], dict]:
    import torch
    from transformers import TextIteratorStreamer

    from openmoe.generation import STOP_TEXT, clean_output, encode_prompts

    enc = encode_prompts(tokenizer, texts, model.config.bos_token_id, model.config.max_position_embeddings,
                         args.max_new_tokens)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    kw = generation_kwargs(args, model, tokenizer)
    torch.manual_seed(args.seed)
    stats = {}
    if args.stats:  # prefill alone, timed, so decode speed can be separated
        t = time.perf_counter()
        with torch.no_grad():
            model(**enc)
        stats["prefill_s"] = time.perf_counter() - t
        stats["prefill_tokens_per_s"] = enc["attention_mask"].sum().item() / stats["prefill_s"]
    t = time.perf_counter()
    if stream_to is not None:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        th = Thread(target=model.generate, kwargs=dict(**enc, **kw, streamer=streamer))
        th.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            text = "".join(pieces)
            if STOP_TEXT in text:
                continue  # stop text reached: keep draining, print nothing more
            stream_to.write(piece)
            stream_to.flush()
        th.join()
        outs = [clean_output("".join(pieces))]
        new_tokens = len(tokenizer("".join(pieces), add_special_tokens=False)["input_ids"])
    else:
        with torch.no_grad():
            gen = model.generate(**enc, **kw)
        new = gen[:, enc["input_ids"].shape[1]:]
        outs = [clean_output(tokenizer.decode(row, skip_special_tokens=True)) for row in new]
        new_tokens = int((new != model.config.pad_token_id).sum())
    elapsed = time.perf_counter() - t
    if "prefill_s" in stats:  # decode alone: the measured prefill taken out
        elapsed = max(elapsed - stats.pop("prefill_s"), 1e-9)
    stats["decode_tokens_per_s"] = new_tokens / elapsed
    stats["new_tokens"] = new_tokens
    return outs, stats


def main(argv=None) -> int:
    args = parse_args(argv)
    model, tokenizer = load(args)
    if args.input:
        rows = [json.loads(line) for line in open(args.input) if line.strip()]
        if not rows:
            raise SystemExit(f"infer.py: --input {args.input!r} has no prompts")
        texts = []
        for i, r in enumerate(rows):
            if "messages" in r and args.chat:
                texts.append(render(args, tokenizer, messages=r["messages"]))
            elif "prompt" in r:
                texts.append(render(args, tokenizer, prompt=r["prompt"]))
            else:
                raise SystemExit(f"infer.py: --input {args.input!r} line {i + 1}: no 'prompt' field")
        stats = run_batches(args, model, tokenizer, rows, texts)
    elif args.prompt is not None:
        if args.compile:
            print(f"compile warm-up: {warm_up(args, model, tokenizer, args.prompt):.1f} s (once)", file=sys.stderr)
        text = render(args, tokenizer, prompt=args.prompt)
        outs, stats = generate(args, model, tokenizer, [text], stream_to=sys.stdout if args.stream else None)
        print("" if args.stream else outs[0])
    elif sys.stdin.isatty():
        stats = interactive(args, model, tokenizer)
    else:
        raise SystemExit("infer.py: give --prompt or --input (stdin is not a terminal for interactive chat)")
    if args.stats:
        print(" | ".join(f"{k} {v:.1f}" for k, v in stats.items()), file=sys.stderr)
    return 0


def run_batches(args, model, tokenizer, rows: list, texts: list[str]) -> dict:
    """--input: batches of --batch-size, each written as it finishes (to OUTPUT.partial, renamed
    to OUTPUT at the end, so a killed run never leaves a complete-looking file), with a progress
    bar of prompts and decode tokens/s."""
    from tqdm import tqdm

    if args.compile:
        print(f"compile warm-up: {warm_up(args, model, tokenizer, texts[0]):.1f} s (once)", file=sys.stderr)
    partial = f"{args.output}.partial" if args.output else None
    sink = open(partial, "w") if partial else sys.stdout
    bar = tqdm(total=len(texts), unit="prompt", file=sys.stderr, disable=None)
    new_tokens, decode_s, stats = 0, 0.0, {}
    try:
        for i in range(0, len(texts), args.batch_size):
            outs, stats = generate(args, model, tokenizer, texts[i:i + args.batch_size])
            for r, o in zip(rows[i:i + args.batch_size], outs):
                sink.write(json.dumps({**r, "output": o}) + "\n")
            sink.flush()
            new_tokens += stats["new_tokens"]
            decode_s += stats["new_tokens"] / max(stats["decode_tokens_per_s"], 1e-9)
            bar.update(len(outs))
            bar.set_postfix(decode_tok_s=f"{new_tokens / max(decode_s, 1e-9):.1f}")
    finally:
        bar.close()
        if partial:
            sink.close()
    if partial:
        os.replace(partial, args.output)
    return {**stats, "decode_tokens_per_s": new_tokens / max(decode_s, 1e-9), "new_tokens": new_tokens}


def interactive(args, model, tokenizer) -> dict:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    stats = {}
    print("multi-turn chat; empty line or Ctrl-D to quit" if args.chat else "empty line or Ctrl-D to quit")
    while True:
        try:
            user = input("> ").strip()
        except EOFError:
            break
        if not user:
            break
        if args.chat:
            messages.append({"role": "user", "content": user})
            text = render(args, tokenizer, messages=messages)
        else:
            text = user
        outs, stats = generate(args, model, tokenizer, [text], stream_to=sys.stdout if args.stream else None)
        print("" if args.stream else outs[0])
        if args.chat:
            messages.append({"role": "assistant", "content": outs[0]})
    return stats


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
