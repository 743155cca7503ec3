"""Generate text or chat with an OpenMoE model folder.

    python infer.py MODEL_DIR --prompt "Once upon a time"
    python infer.py MODEL_DIR --chat --system "You are helpful." --prompt "Hi!"
    python infer.py MODEL_DIR --chat                 # interactive multi-turn (stdin a terminal)
    python infer.py MODEL_DIR --input prompts.jsonl --output out.jsonl --batch-size 8   # batches
    python infer.py MODEL_DIR --compile --prompt "..."   # static cache + compiled decode step
    python infer.py BASE_DIR --adapter ADAPTER_DIR --prompt "..."        # with a LoRA adapter (PEFT format)

Works on folders from save_pretrained, train.py, convert_jax_checkpoint.py and the published
ColossalAI-layout checkpoints. Stops on eos and on `</s>` spelled as text.

Checks before generating: the folder's manifest.json when it has one (sha256 of every file;
--no-verify skips), config.json, the flags, every --input line and that --output can be
written; --output is written whole (temporary file renamed) or not at all. Errors: one line
naming the flag, line or file, exit status 2 (--debug adds the traceback).
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
    ap.add_argument("--no-verify", action="store_true", help="skip the sha256 check against MODEL_DIR/manifest.json")
    ap.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    args = ap.parse_args(argv)
    if args.dtype == "float16":
        ap.error("--dtype float16: OpenMoE degrades in fp16 (activations overflow); use bfloat16 or float32")
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    if args.num_beams < 1:
        ap.error(f"--num-beams {args.num_beams}: must be >= 1")
    if not 0 < args.top_p <= 1:
        ap.error(f"--top-p {args.top_p}: must be in (0, 1]")
    if not args.temperature > 0:
        ap.error(f"--temperature {args.temperature}: must be > 0")
    if args.top_k < 0:
        ap.error(f"--top-k {args.top_k}: must be >= 0 (0: off)")
    if not args.repetition_penalty > 0:
        ap.error(f"--repetition-penalty {args.repetition_penalty}: must be > 0")
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
    if args.input and not Path(args.input).is_file():
        ap.error(f"--input {args.input!r}: no such file")
    if args.output:  # before loading and generating, not after
        from openmoe.utils.cli import check_writable, remove_stale_temps

        try:
            check_writable(args.output, "--output")
        except ValueError as e:
            ap.error(str(e))
        remove_stale_temps(args.output)  # of a run killed with SIGKILL
    return args


def check_model_dir(args) -> None:
    """Before the tokenizer and the weights: the manifest (sha256 of every file, when the folder
    has one: train.py and convert_jax_checkpoint.py write it) and config.json, blamed by name."""
    import openmoe  # noqa: F401
    from openmoe import OpenMoeConfig
    from openmoe.utils.cli import read_json_object
    from openmoe.utils.manifest import verify_manifest

    if not args.no_verify:
        verify_manifest(args.model_dir, required=False)
    cfg_file = Path(args.model_dir) / "config.json"
    try:
        read_json_object(cfg_file)
    except ValueError as e:  # bad JSON, bad UTF-8, not an object
        raise ValueError(f"{cfg_file}: not a valid config ({e})") from None
    try:
        OpenMoeConfig.from_pretrained(args.model_dir)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{cfg_file}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                         ) from None


def load(args):
    import torch
    from transformers import AutoTokenizer

    import openmoe  # noqa: F401  (registers the Auto classes)
    from openmoe import OpenMoeForCausalLM

    check_model_dir(args)
    tok_dir = args.tokenizer or args.model_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"{tok_dir}: no usable tokenizer ({type(e).__name__}); pass --tokenizer DIR") from None
    tokenizer.padding_side = "left"
    dtype = getattr(torch, args.dtype)
    kw = dict(dtype=dtype, attn_implementation=args.attn_implementation)
    if args.device == "auto":
        kw["device_map"] = "auto"
    # OpenMoeForCausalLM also reads the ColossalAI layout (model_type "llama").
    try:
        model = OpenMoeForCausalLM.from_pretrained(args.model_dir, **kw).eval()
    except Exception as e:  # noqa: BLE001  (truncated or corrupt weight files: SafetensorError, pickle errors)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{_bad_weight_file(args.model_dir)}: cannot load the weights ({type(e).__name__}: "
                         f"{msg})") from None
    if args.adapter:  # LoRA through PEFT, experts on the grouped-GEMM path (openmoe/peft)
        from openmoe.peft import load_adapter

        try:
            load_adapter(model, args.adapter)
        except ValueError as e:
            raise ValueError(f"--adapter {args.adapter}: {e}") from None
        model.eval()
    if args.device == "cuda":
        model = model.to("cuda")
    return model, tokenizer


def _bad_weight_file(model_dir: str) -> str:
    """The first .safetensors file whose header does not parse (else the folder)."""
    from safetensors import safe_open

    for f in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception:  # noqa: BLE001
            return str(f)
    return str(model_dir)


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


def read_input(path: str, chat: bool) -> list[dict]:
    """The rows of an --input jsonl; a bad line is named by its number."""
    rows = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise ValueError(f"--input {path}: not UTF-8 text ({e.reason})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise ValueError(f"--input {path} line {n}: not JSON ({e})") from None
        if not isinstance(r, dict):
            raise ValueError(f"--input {path} line {n}: expected a JSON object, got {type(r).__name__}")
        if chat and "messages" in r:
            if not isinstance(r["messages"], list) or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) for m in r["messages"]):
                raise ValueError(f"--input {path} line {n}: 'messages' must be a list of "
                                 f"{{\"role\": ..., \"content\": \"...\"}}")
        elif "prompt" not in r:
            raise ValueError(f"--input {path} line {n}: no 'prompt' field")
        elif not isinstance(r["prompt"], str):
            raise ValueError(f"--input {path} line {n}: 'prompt' is {type(r['prompt']).__name__}, not text")
        rows.append(r)
    if not rows:
        raise ValueError(f"--input {path}: has no prompts")
    return rows


def main(argv=None) -> int:
    from openmoe.utils.cli import cli_errors

    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    with cli_errors("infer.py", debug=debug) as status:
        return _main(parse_args(argv))
    return status.code


def _main(args) -> int:
    from openmoe.utils.cli import atomic_path

    rows = read_input(args.input, args.chat) if args.input else None  # bad lines before loading
    model, tokenizer = load(args)
    if args.input:
        texts = []
        for r in rows:
            if "messages" in r and args.chat:
                texts.append(render(args, tokenizer, messages=r["messages"]))
            else:
                texts.append(render(args, tokenizer, prompt=r["prompt"]))
        if args.output:  # written whole or not at all: batches go to a temporary, renamed at the end
            with atomic_path(args.output) as tmp:
                stats = run_batches(args, model, tokenizer, rows, texts, tmp)
        else:
            stats = run_batches(args, model, tokenizer, rows, texts, None)
    elif args.prompt is not None:
        if args.compile:
            print(f"compile warm-up: {warm_up(args, model, tokenizer, args.prompt):.1f} s (once)", file=sys.stderr)
        text = render(args, tokenizer, prompt=args.prompt)
        outs, stats = generate(args, model, tokenizer, [text], stream_to=sys.stdout if args.stream else None)
        print("" if args.stream else outs[0])
    elif sys.stdin.isatty():
        stats = interactive(args, model, tokenizer)
    else:
        raise ValueError("give --prompt or --input (stdin is not a terminal for interactive chat)")
    if args.stats:
        print(" | ".join(f"{k} {v:.1f}" for k, v in stats.items()), file=sys.stderr)
    return 0


def run_batches(args, model, tokenizer, rows: list, texts: list[str], path) -> dict:
    """--input: batches of --batch-size, each written to `path` (stdout if None) as it finishes,
    with a progress bar of prompts and decode tokens/s."""
    from tqdm import tqdm

    if args.compile:
        print(f"compile warm-up: {warm_up(args, model, tokenizer, texts[0]):.1f} s (once)", file=sys.stderr)
    sink = open(path, "w") if path is not None else sys.stdout
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
        if path is not None:
            sink.close()
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
