"""openmoe/serve.py: `transformers serve` on an OpenMoE folder, over real HTTP on localhost:
completions, chat with the template and streaming, stop on `</s>` spelled as text, concurrent
requests, bad requests answered 4xx while the server keeps serving.

The server runs in a subprocess whose model is forced (by the launcher below, not by product code)
to continue any text with ` the</s>` over and over, so the stop is observable."""

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="serving extra not installed (pip install 'transformers[serving]')")
pytest.importorskip("uvicorn", reason="serving extra not installed")


def _post(url, body, raw: bytes | None = None):
    """(status, parsed JSON or text) of a POST, with the standard library's HTTP client."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _stream(url, body, max_lines: int | None = None):
    """The `data:` events of a streamed POST; stops reading (and hangs up) after max_lines."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                if max_lines and len(events) >= max_lines:
                    break
    return events


def _health(url) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False

_LAUNCH = '''
import json, sys
import torch
from openmoe import OpenMoeForCausalLM, serve

NEXT = {int(k): v for k, v in json.loads(sys.argv[1]).items()}  # last token -> the forced next one
real = OpenMoeForCausalLM.forward

def forward(self, *a, **k):
    out = real(self, *a, **k)
    ids = k["input_ids"] if k.get("input_ids") is not None else a[0]
    nxt = torch.tensor([NEXT.get(int(t), NEXT[-1]) for t in ids[:, -1]])
    logits = torch.full_like(out.logits, -1e9)
    logits[torch.arange(len(nxt)), -1, nxt] = 0
    out.logits = logits
    return out

OpenMoeForCausalLM.forward = forward
sys.exit(serve.main(sys.argv[2:]))
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from helpers import OBJECTS, SUBJECTS, VERBS, tiny_config

    from openmoe import OpenMoeForCausalLM
    from openmoe.data import TextTokenizer, train_sentencepiece
    from openmoe.generation import ensure_chat_template

    d = tmp_path_factory.mktemp("serve")
    texts = [f"{s} {v} {o}." for s in SUBJECTS for v in VERBS for o in OBJECTS] + ["a </s> b <s>[INST] x [/INST]"]
    tok = TextTokenizer(train_sentencepiece(texts, str(d / "spm"), 400)).hf
    ensure_chat_template(tok)
    torch.manual_seed(0)
    OpenMoeForCausalLM(tiny_config(vocab_size=len(tok), capacity_policy="dropless",
                                   max_position_embeddings=256)).save_pretrained(d / "m")
    tok.save_pretrained(d / "m")
    chain = tok("the</s>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert len(set(chain)) == len(chain) and tok.unk_token_id not in chain
    nxt = {-1: chain[0], **{a: b for a, b in zip(chain, chain[1:] + chain[:1])}}
    (d / "launch.py").write_text(_LAUNCH)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(d / "launch.py"), json.dumps(nxt), str(d / "m"), "--port",
                             str(port), "--host", "127.0.0.1", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if _health(url):
            break
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not come up in 120 s")
    yield url, str(d / "m"), tok, chain
    proc.terminate()
    proc.wait(timeout=30)


def test_completion_stops_on_stop_text(server):
    url, model, tok, chain = server
    status, r = _post(f"{url}/v1/completions", {"model": model, "prompt": "the cat", "max_tokens": 20})
    assert status == 200, r
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == len(chain) < 20  # ' the' then the pieces of '</s>'
    assert r["usage"]["prompt_tokens"] == len(tok("the cat")["input_ids"])  # BOS 0 + the text's ids
    assert choice["text"].startswith(" the") or choice["text"].startswith("the")


def test_chat_streams_with_the_template(server):
    url, model, tok, chain = server
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chunks = _stream(f"{url}/v1/chat/completions", {"model": model, "messages": msgs, "max_tokens": 20,
                                                    "stream": True, "stream_options": {"include_usage": True}})
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finish = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]]
    assert "the" in text and "stop" in finish
    usage = [c["usage"] for c in chunks if c.get("usage")]
    want = len(tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"])
    assert usage and usage[-1]["prompt_tokens"] == want


def test_concurrent_requests(server):
    url, model, _, _ = server

    def ask(i):
        return _post(f"{url}/v1/completions", {"model": model, "prompt": f"a dog {i}", "max_tokens": 8})[1]

    with ThreadPoolExecutor(6) as ex:
        outs = list(ex.map(ask, range(6)))
    assert all(o["choices"][0]["finish_reason"] == "stop" for o in outs)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    url, model, _, _ = server
    bad = [_post(f"{url}/v1/completions", None, raw=b"{not json"),
           _post(f"{url}/v1/chat/completions", {"model": model, "messages": []}),
           _post(f"{url}/v1/completions", {"model": model}),
           _post(f"{url}/v1/completions", {"model": "other", "prompt": "x"}),
           _post(f"{url}/v1/completions", {"model": model, "prompt": "x", "max_tokens": 10_000})]
    assert [status for status, _ in bad] == [400, 400, 400, 404, 400], [(s, str(b)[:150]) for s, b in bad]
    assert "positions" in json.loads(bad[-1][1])["error"]["message"]
    # a client that hangs up mid-stream frees its slot
    _stream(f"{url}/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                           "max_tokens": 20, "stream": True}, max_lines=1)
    status, _ = _post(f"{url}/v1/completions", {"model": model, "prompt": "x", "max_tokens": 3})
    assert status == 200 and _health(url)


# -- the request check on its own, by hand ---------------------------------------------------------

def _check(path, body, n_prompt=10):
    from openmoe.serve import check_request

    return check_request(path, body, served="/m", max_positions=64, count_tokens=lambda b: n_prompt)


def test_check_request_by_hand():
    chat, comp = "/v1/chat/completions", "/v1/completions"
    ok = {"role": "user", "content": "hi"}
    assert _check(chat, {"messages": [ok], "max_tokens": 54}) is None  # 10 + 54 = 64 positions: fits
    assert _check(chat, {"messages": [ok], "max_tokens": 55})[0] == 400  # one past
    assert _check(chat, {"model": "/m/", "messages": [ok]}) is None  # the same folder, spelled differently
    assert _check(chat, {"model": "x", "messages": [ok]})[0] == 404
    assert _check(chat, {"messages": []})[0] == 400
    assert _check(chat, {"messages": [{"content": "no role"}]})[1].startswith("messages[0]")
    assert _check(chat, [1, 2])[0] == 400
    assert _check(comp, {"prompt": "x", "max_tokens": 0})[0] == 400
    assert _check(comp, {"prompt": "x", "max_tokens": True})[0] == 400
    assert _check(comp, {"prompt": 3})[0] == 400 and _check(comp, {})[0] == 400
    assert _check(comp, {"prompt": ["a", "b"], "max_completion_tokens": 5}) is None


# -- bench/serve.py must not rot: one run at the tiniest shape ---------------------------------------

def test_bench_serve_smoke():
    """The bench's server with --continuous-batching (the one with the extra flags; the plain server is the
    fixture's above) starts, answers 2 requests in turn and at once, and is gone afterwards; the table has a
    row of positive rates. Only that server and one thread, to keep this near 10 s on the shared 2 cores
    (9 s; 25 s at load average 7)."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "bench" / "serve.py"), "--config", "tiny", "--requests", "2",
                        "--max-tokens", "2", "--prompt-tokens", "8", "--device", "cpu", "--batching", "on",
                        "--threads", "1", "--startup-timeout", "120"],
                       capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [line.split("|") for line in r.stdout.splitlines() if line.startswith("| on |")]
    assert len(rows) == 1, r.stdout[-2000:]
    seq, conc = float(rows[0][2]), float(rows[0][3])
    assert seq > 0 and conc > 0
    ports = re.findall(r"up at http://127\.0\.0\.1:(\d+)", r.stdout)
    assert len(ports) == 1 and not _health(f"http://127.0.0.1:{ports[0]}")  # the server was stopped
