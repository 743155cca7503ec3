"""Serving throughput: 16 concurrent completion requests against the same 16 sent one after another,
through `python -m openmoe.serve` (= `transformers serve`), with and without `--continuous-batching`.

    python bench/serve.py [--config tiny|base|8b] [--model-dir DIR] [--requests 16] [--max-tokens 32]
        [--prompt-tokens 32] [--batching off,on] [--device cpu|cuda] [--dtype float32|bfloat16]

The model is a random OpenMoE of the config (configs/NAME, as bench/decode.py builds it) saved with
save_pretrained next to a small sentencepiece tokenizer; --model-dir reuses (or keeps) that folder.
Each server is started as a subprocess, warmed with one request, then gets N requests in turn
and N at once from N threads (standard library HTTP). Prompts are distinct (no shared prefix for
the paged cache to reuse) and of one token length; greedy; tokens counted from each response's
`usage.completion_tokens` (the API has no "ignore eos", so a request may stop early).
The issue's target: concurrent tokens/s >= 4x sequential with continuous batching.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(__file__))
from common import describe_machine  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "pe", "du", "ga", "bo"]


def _words(n: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))))
    return sorted(out)


def make_model_dir(path: str, config: str, device: str, dtype: str) -> None:
    """A random OpenMoE of configs/CONFIG with a sentencepiece tokenizer whose words are one piece each."""
    import torch

    from openmoe import OpenMoeConfig, OpenMoeForCausalLM
    from openmoe.data import TextTokenizer, train_sentencepiece
    from openmoe.generation import ensure_chat_template

    words = _words()
    rng = random.Random(1)
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    os.makedirs(path, exist_ok=True)
    tok = TextTokenizer(train_sentencepiece(texts, os.path.join(path, "spm"), 400)).hf
    ensure_chat_template(tok)
    cfg = OpenMoeConfig.from_pretrained(os.path.join(ROOT, "configs", config))
    cfg.vocab_size = max(cfg.vocab_size, len(tok))  # the config's vocabulary (lm_head cost) is kept
    torch.manual_seed(0)
    with torch.device(device):
        model = OpenMoeForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    for ext in (".model", ".vocab"):
        os.remove(os.path.join(path, "spm" + ext))


def prompts(tokenizer, n: int, length: int) -> list[str]:
    """n distinct prompts of exactly `length` tokens (BOS included) with `tokenizer(text)`."""
    words, out = _words(), []
    for i in range(n):
        rng = random.Random(100 + i)
        for _ in range(100):
            text = " ".join(rng.choice(words) for _ in range(length - 1))
            if len(tokenizer(text)["input_ids"]) == length:
                out.append(text)
                break
        else:
            raise ValueError(f"bench/serve.py: no prompt of {length} tokens found for request {i}")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def complete(url: str, model: str, prompt: str, max_tokens: int, timeout: float) -> tuple[float, int, int]:
    """(seconds, completion tokens, prompt tokens) of one greedy /v1/completions request."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            usage = json.loads(r.read())["usage"]
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"request failed: HTTP {e.code}: {e.read().decode(errors='replace')[:300]}") from None
    return time.perf_counter() - t, usage["completion_tokens"], usage["prompt_tokens"]


class Server:
    """`python -m openmoe.serve DIR` in a subprocess; killed on exit (also on errors and Ctrl-C)."""

    def __init__(self, model_dir: str, device: str, cb_flags: list[str] | None, log_path: str, startup_s: float,
                 threads: int | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "openmoe.serve", model_dir, "--host", "127.0.0.1", "--port", str(self.port),
               "--device", device, "--log-level", "error"] + (["--continuous-batching", *cb_flags] if cb_flags else [])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self._wait(startup_s)

    def _wait(self, startup_s: float) -> None:
        deadline = time.time() + startup_s
        while time.time() < deadline:
            if _get(f"{self.url}/health"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.5)
        raise RuntimeError(f"the server did not answer /health within {startup_s:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-n:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def cb_flags(args) -> list[str]:
    """The paged cache sized for the workload. Unsized, transformers gives it a share of the free memory
    (on CPU 60% of the machine's RAM, zeroed at the first request: minutes, and other jobs' memory)."""
    pages = args.requests * -(-(args.prompt_tokens + 8 + args.max_tokens) // 256) + 2  # 256-token pages, + warm-up
    return ["--cb-num-blocks", str(pages), "--cb-max-batch-tokens", str(args.requests * (args.prompt_tokens + 8))]


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))]  # nearest rank


def run_load(url: str, model: str, texts: list[str], max_tokens: int, timeout: float):
    """Sequential then concurrent: ((tok/s, latencies), (tok/s, latencies)), printing as it goes."""
    seq_lat, seq_tok, t0 = [], 0, time.perf_counter()
    for i, p in enumerate(texts):
        s, n, _ = complete(url, model, p, max_tokens, timeout)
        seq_lat.append(s)
        seq_tok += n
        print(f"  sequential {i + 1}/{len(texts)}: {s:.2f} s, {n} tokens", flush=True)
    seq_rate = seq_tok / (time.perf_counter() - t0)

    start = threading.Barrier(len(texts) + 1)

    def one(p):
        start.wait()
        return complete(url, model, p, max_tokens, timeout)

    with ThreadPoolExecutor(len(texts)) as ex:
        futures = [ex.submit(one, p) for p in texts]
        start.wait()
        t0 = time.perf_counter()
        results = [f.result() for f in futures]
        wall = time.perf_counter() - t0
    conc_lat = [s for s, _, _ in results]
    conc_rate = sum(n for _, n, _ in results) / wall
    print(f"  concurrent: {len(texts)} requests in {wall:.2f} s, "
          f"{sum(n for _, n, _ in results)} tokens", flush=True)
    return (seq_rate, seq_lat), (conc_rate, conc_lat)


def measure(mode: str, model_dir: str, device: str, texts: list[str], warm: str, args, tmp: str) -> tuple:
    """One server (continuous batching `mode`): warm-up request, then the load; its table row."""
    print(f"server with continuous batching {mode}: starting ...", flush=True)
    t = time.perf_counter()
    log = os.path.join(tmp, f"server-{mode}.log")
    with Server(model_dir, device, cb_flags(args) if mode == "on" else None, log, args.startup_timeout,
                args.threads) as srv:
        print(f"  up at {srv.url} in {time.perf_counter() - t:.1f} s; warm-up request ...", flush=True)
        s, _, n_prompt = complete(srv.url, model_dir, warm, args.max_tokens, args.request_timeout)
        print(f"  warm-up {s:.2f} s (prompt {n_prompt} tokens)", flush=True)
        try:
            (seq, seq_lat), (conc, lat) = run_load(srv.url, model_dir, texts, args.max_tokens, args.request_timeout)
        except Exception:
            print(f"server log:\n{srv.tail()}", flush=True)
            raise
    return mode, seq, conc, sum(seq_lat) / len(seq_lat), lat


def _interrupt(*_):
    """SIGTERM (`timeout`, a scheduler) unwinds like Ctrl-C, so the `with Server` blocks kill the servers."""
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="base", help="a folder of configs/ (tiny, base, 8b)")
    ap.add_argument("--model-dir", default=None, help="reuse this model folder; built there if it has no config.json")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--batching", default="off,on", help="servers to run: off (sequential generate), on "
                    "(--continuous-batching)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default=None, help="weights saved in: bfloat16 on CUDA, float32 on CPU by default")
    ap.add_argument("--threads", type=int, default=None, help="the server's OMP_NUM_THREADS (on a CPU shared "
                    "with other jobs, 1 avoids OpenMP threads waiting on each other)")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--request-timeout", type=float, default=1800)
    args = ap.parse_args(argv)
    modes = args.batching.split(",")
    if not modes or any(m not in ("off", "on") for m in modes):
        ap.error(f"--batching takes off and/or on, comma-separated, not {args.batching!r}")
    if args.requests < 1 or args.max_tokens < 1 or args.prompt_tokens < 2:
        ap.error("--requests and --max-tokens must be >= 1, --prompt-tokens >= 2")
    signal.signal(signal.SIGTERM, _interrupt)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    print(describe_machine())
    print(f"load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model_dir = os.path.abspath(args.model_dir or os.path.join(tmp, "model"))
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            t = time.perf_counter()
            print(f"building a random {args.config} model in {model_dir} ({dtype}) ...", flush=True)
            make_model_dir(model_dir, args.config, device, dtype)
            if device == "cuda":
                torch.cuda.empty_cache()  # the server process needs the memory
            print(f"  built and saved in {time.perf_counter() - t:.1f} s", flush=True)
        from transformers import AutoTokenizer

        *texts, warm = prompts(AutoTokenizer.from_pretrained(model_dir), args.requests + 1, args.prompt_tokens)
        rows = [measure(mode, model_dir, device, texts, warm, args, tmp) for mode in modes]
    print(f"\nconfig {args.config} | {device} {dtype} | server threads {args.threads or 'default'} | "
          f"{args.requests} requests | prompt {args.prompt_tokens} tokens | max_tokens {args.max_tokens} | greedy | "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("| continuous batching | sequential tok/s | concurrent tok/s | concurrent / sequential | "
          "sequential latency mean s | concurrent latency mean / p50 / p95 s |")
    print("|---|---|---|---|---|---|")
    for mode, seq, conc, seq_mean, lat in rows:
        print(f"| {mode} | {seq:.1f} | {conc:.1f} | {conc / seq:.2f}x | {seq_mean:.2f} | "
              f"{sum(lat) / len(lat):.2f} / {_pct(lat, 0.5):.2f} / {_pct(lat, 0.95):.2f} |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
