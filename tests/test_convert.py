"""convert_jax_checkpoint.py end to end: a tiny OpenMoE checkpoint in the real T5X on-disk format
converts to a folder that AutoModelForCausalLM loads, with every tensor equal to its source and
logits equal to an independent numpy forward over the raw Jax-layout arrays; every kind of bad
input fails with one line, a non-zero exit and no output; memory stays flat."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

sys.path.insert(0, str(Path(__file__).parent / "checkpoint"))
from t5x_fixture import random_params, t5x_shapes, write_checkpoint  # noqa: E402

from openmoe.cli import convert as cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BF16 = "decoder/layers_1/mlp/expert/wo/kernel"
INLINE = {"decoder/layers_0/pre_mlp_layer_norm/scale", "decoder/layers_2/self_attention/key/kernel"}
CHUNKED = {"decoder/decoder_norm/scale"}


def _tiny_checkpoint(folder: Path, **kw):
    params = random_params(tiny_config(), seed=1, bf16={BF16})
    emb = params["token_embedder/embedding"]
    emb[66:] = 0  # the embedding's edge chunk 2 (rows 66-96) is all fill value: its file is not written
    write_checkpoint(folder, params, inline=INLINE, chunked=CHUNKED,
                     skip_chunks={"token_embedder/embedding": {(2, 0)}}, **kw)
    return folder, params


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    ckpt, params = _tiny_checkpoint(tmp / "checkpoint_1000")
    assert not (ckpt / "target.token_embedder.embedding" / "2.0").exists()
    cfg_file = tmp / "tiny.json"
    cfg_file.write_text(tiny_config().to_json_string())
    rc = cli.main([str(ckpt), str(tmp / "out"), "--config", str(cfg_file), "--max-shard-size", "30KB",
                   "--no-progress"])
    assert rc == 0
    return tmp / "out", params


# -- the independent reference: numpy, Jax layout ([in, out] kernels, [E, in, out] experts) ------

def _rms(x, scale):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * scale


def _gated(x, wi_0, wi_1, wo):
    g = x @ wi_0
    a, b = np.split(g, 2, axis=-1)
    return (a * (b / (1 + np.exp(-b))) * (x @ wi_1)) @ wo


def _rope(x, pos):  # x [S, heads, d]; rotate-half over the full head_dim, theta 10000
    d = x.shape[-1]
    ang = pos[:, None] * 10000.0 ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin


def jax_layout_logits(p: dict, ids, heads: int, head_dim: int, top_k: int = 2):
    p = {k: v.double().numpy() for k, v in p.items()}
    S = len(ids)
    x = p["token_embedder/embedding"][ids]
    layer = 0
    while f"decoder/layers_{layer}/pre_mlp_layer_norm/scale" in p:
        q_ = f"decoder/layers_{layer}/"
        h = _rms(x, p[q_ + "pre_self_attention_layer_norm/scale"])
        q, k, v = (h @ p[q_ + f"self_attention/{n}/kernel"] for n in ("query", "key", "value"))
        q, k, v = (t.reshape(S, heads, head_dim) for t in (q, k, v))
        q, k = _rope(q, np.arange(S)), _rope(k, np.arange(S))
        scores = np.einsum("qhd,khd->hqk", q, k) + np.triu(np.full((S, S), -1e10), 1)  # no 1/sqrt(d)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", w, v).reshape(S, -1) @ p[q_ + "self_attention/out/kernel"]
        h = _rms(x, p[q_ + "pre_mlp_layer_norm/scale"])
        router = q_ + "mlp/router/router_weights/w/kernel"
        if router in p:
            logits = h @ p[router]
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            y = np.zeros_like(x)
            for t in range(S):
                for e in np.argsort(-probs[t], kind="stable")[:top_k]:  # raw probabilities as weights
                    y[t] += probs[t, e] * _gated(h[t], *(p[q_ + f"mlp/expert/{n}/kernel"][e] for n in ("wi_0", "wi_1", "wo")))
            x = x + y
            h = _rms(x, p[q_ + "pre_extra_mlp_layer_norm/scale"])
            x = x + _gated(h, *(p[q_ + f"extra_mlp/{n}/kernel"] for n in ("wi_0", "wi_1", "wo")))
        else:
            x = x + _gated(h, *(p[q_ + f"mlp/{n}/kernel"] for n in ("wi_0", "wi_1", "wo")))
        layer += 1
    return _rms(x, p["decoder/decoder_norm/scale"]) @ p["decoder/logits_dense/kernel"]


# -- the good path ---------------------------------------------------------------------------------

def test_output_folder_layout(converted):
    out, _ = converted
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 3 and all(f"-of-{len(shards):05d}.safetensors" in f for f in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"], gen["bos_token_id"]) == (1, 0, 0)
    assert "stop_strings" not in gen  # generate() would fail without a tokenizer; the model adds it
    assert not [f for f in os.listdir(out.parent) if ".tmp-" in f]


def test_every_tensor_equals_its_source(converted):
    from transformers import AutoModelForCausalLM

    out, params = converted
    model = AutoModelForCausalLM.from_pretrained(out)
    sd = model.state_dict()
    assert sd["model.embed_tokens.weight"][66:].abs().sum() == 0  # the unwritten chunk: fill value
    for i in range(4):
        L, T = f"model.layers.{i}.", f"decoder/layers_{i}/"
        pairs = {"input_layernorm.weight": ("pre_self_attention_layer_norm/scale", False),
                 "post_attention_layernorm.weight": ("pre_mlp_layer_norm/scale", False)}
        for n, t in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
            pairs[f"self_attn.{n}_proj.weight"] = (f"self_attention/{t}/kernel", True)
        mlp = "extra_mlp" if i % 2 else "mlp"
        for n, t in (("gate", "wi_0"), ("up", "wi_1"), ("down", "wo")):
            pairs[f"{mlp}.{n}_proj.weight"] = (f"{mlp}/{t}/kernel", True)
        if i % 2:  # MoE layers 1 and 3
            pairs["mlp.gate_weight"] = ("mlp/router/router_weights/w/kernel", True)  # [H, E] -> [E, H]
            pairs["pre_extra_mlp_layernorm.weight"] = ("pre_extra_mlp_layer_norm/scale", False)
            for n, t in (("wi_gate", "wi_0"), ("wi_up", "wi_1"), ("wo", "wo")):
                pairs[f"mlp.experts.{n}"] = (f"mlp/expert/{t}/kernel", False)  # [E, in, out] as is
        for hf, (t5x, transpose) in pairs.items():
            src = params[T + t5x].float()
            assert torch.equal(sd[L + hf], src.t() if transpose else src), L + hf
    assert torch.equal(sd["lm_head.weight"], params["decoder/logits_dense/kernel"].t())
    assert torch.equal(sd["model.norm.weight"], params["decoder/decoder_norm/scale"])
    assert sd["model.layers.1.mlp.experts.wo"].shape == (4, 48, 32)
    assert len(sd) == len(params)


def test_logits_equal_an_independent_jax_layout_forward(converted):
    from transformers import AutoModelForCausalLM

    out, params = converted
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = [0, 5, 17, 3, 88, 42, 9, 61]  # BOS 0; 8 tokens: t5x groups of 2, capacity 4, nothing dropped
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double().numpy()
    want = jax_layout_logits(params, ids, heads=4, head_dim=16)
    assert np.abs(want).max() > 1.0  # not a degenerate comparison
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_bfloat16_output_and_inferred_config(tmp_path):
    ckpt, params = _tiny_checkpoint(tmp_path / "c", kvstore="gcs")
    rc = cli.main([str(ckpt), str(tmp_path / "out"), "--dtype", "bfloat16", "--head-dim", "16", "--no-progress"])
    assert rc == 0
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (conf["num_attention_heads"], conf["head_dim"], conf["moe_layer_interval"], conf["dtype"]) == \
        (4, 16, 2, "bfloat16")
    from safetensors import safe_open

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.experts.wo"
    with safe_open(tmp_path / "out" / index["weight_map"][name], "pt") as f:
        t = f.get_tensor(name)
    assert t.dtype == torch.bfloat16 and torch.equal(t, params[BF16])  # bf16 source: exact


# Chunk layouts that reach every write path: whole output rows (pwrite) and regions that are
# not (transposed row blocks, column blocks: the mmap path), with edge chunks on both axes.
_LAYOUTS = {
    "rows": lambda n, s: [max(1, s[0] // 3 + 1), *s[1:]],
    "columns": lambda n, s: [max(1, s[0] // 2 + 1), *s[1:-1], max(1, s[-1] // 3 + 1)] if len(s) > 1 else [3],
}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shard_bytes_are_the_header_then_each_tensor(tmp_path, layout, dtype):
    """Byte for byte: every shard is its header followed by each tensor, converted by torch from
    the source arrays (transposed, cast), in the header's order with no gap."""
    from openmoe.checkpoint import convert
    from openmoe.checkpoint.keymap import TRANSPOSE, to_t5x

    params = random_params(tiny_config(vocab_size=61), seed=4, bf16={BF16})
    ckpt = write_checkpoint(tmp_path / "c", params, inline=INLINE, chunks=_LAYOUTS[layout],
                            skip_chunks={"token_embedder/embedding": {(1, 0)}})
    emb = params["token_embedder/embedding"]
    rows, cols = _LAYOUTS[layout]("", tuple(emb.shape))
    emb[rows:2 * rows, :cols] = 0  # the unwritten chunk (1, 0) reads as the fill value
    out = convert(ckpt, tmp_path / "out", head_dim=16, dtype=dtype, max_shard_size="20KB", progress=False,
                  fsync=False, log=lambda *_: None)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 3
    seen = 0
    for shard in shards:
        raw = shard.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__")
        want = []
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
            t5x, op = to_t5x(name)
            t = params[t5x].t() if op == TRANSPOSE else params[t5x]
            t = t.to(getattr(torch, dtype)).contiguous()
            assert entry["shape"] == list(t.shape) and entry["data_offsets"][0] == sum(map(len, want)), name
            want.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        assert raw[8 + n:] == b"".join(want), shard.name
        seen += len(header)
    assert seen == len(params)


def _spm_model(folder: Path) -> Path:
    import sentencepiece as spm

    text = folder / "corpus.txt"
    text.write_text("\n".join(["the cat sat on the mat", "a dog runs in the park", "hello world"] * 30))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "m"), vocab_size=24,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return folder / "m.model"


def test_tokenizer_with_chat_template(tmp_path):
    from transformers import AutoTokenizer

    ckpt, _ = _tiny_checkpoint(tmp_path / "c")
    spm_file = _spm_model(tmp_path)
    rc = cli.main([str(ckpt), str(tmp_path / "out"), "--head-dim", "16", "--tokenizer", str(spm_file),
                   "--tokenizer-extra-ids", "10", "--no-progress"])
    assert rc == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (tok.pad_token_id, tok.eos_token_id, len(tok)) == (0, 1, 34)
    text = tok.apply_chat_template([{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}],
                                   tokenize=False)
    assert text == "<pad><<SYS>>\nbe kind\n<</SYS>>\n\n<s>[INST] hi [/INST]"
    assert tok.decode(tok("the cat", add_special_tokens=False)["input_ids"]) == "the cat"


# -- bad input: one line naming parameter and file, exit 2, nothing written -----------------------

def _fails(capsys, tmp_path, ckpt, *extra, match):
    out = tmp_path / "out"
    rc = cli.main([str(ckpt), str(out), "--head-dim", "16", "--no-progress", "--max-shard-size", "20KB", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("convert_jax_checkpoint.py: error: ") and "\n" not in err, err
    assert all(m in err for m in match), err
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_truncated_chunk_mid_stream_leaves_nothing(tmp_path, capsys):
    ckpt, _ = _tiny_checkpoint(tmp_path / "c")
    chunk = ckpt / "target.decoder.logits_dense.kernel" / "1.0"  # the last parameter: shards already written
    chunk.write_bytes(chunk.read_bytes()[:100])
    _fails(capsys, tmp_path, ckpt, match=["decoder/logits_dense/kernel", str(chunk), "truncated"])


def test_missing_array_folder(tmp_path, capsys):
    ckpt, _ = _tiny_checkpoint(tmp_path / "c")
    shutil.rmtree(ckpt / "target.decoder.layers_3.mlp.expert.wi_1.kernel")
    _fails(capsys, tmp_path, ckpt, match=["decoder/layers_3/mlp/expert/wi_1/kernel",
                                          str(ckpt / "target.decoder.layers_3.mlp.expert.wi_1.kernel"), "missing"])


def test_unexpected_parameter(tmp_path, capsys):
    params = random_params(tiny_config())
    params["decoder/layers_0/self_attention/relpos_bias/rel_embedding"] = torch.zeros(4, 32)
    ckpt = write_checkpoint(tmp_path / "c", params)
    _fails(capsys, tmp_path, ckpt, match=["unexpected parameter decoder/layers_0/self_attention/relpos_bias",
                                          "target.decoder.layers_0.self_attention.relpos_bias.rel_embedding"])


def test_missing_parameter(tmp_path, capsys):
    params = random_params(tiny_config())
    del params["decoder/layers_2/mlp/wo/kernel"]
    ckpt = write_checkpoint(tmp_path / "c", params)
    _fails(capsys, tmp_path, ckpt, match=["missing parameter decoder/layers_2/mlp/wo/kernel", str(ckpt / "checkpoint")])


def test_shape_mismatch(tmp_path, capsys):
    params = random_params(tiny_config())
    params["decoder/layers_2/self_attention/out/kernel"] = torch.zeros(60, 32)
    ckpt = write_checkpoint(tmp_path / "c", params)
    _fails(capsys, tmp_path, ckpt, match=["decoder/layers_2/self_attention/out/kernel: shape [60, 32] in",
                                          "target.decoder.layers_2.self_attention.out.kernel", "[64, 32]"])


def test_explicit_config_mismatch_names_every_field(tmp_path, capsys):
    ckpt, _ = _tiny_checkpoint(tmp_path / "c")
    _fails(capsys, tmp_path, ckpt, "--config", "base",
           match=["--config base does not match the checkpoint", "vocab_size: config 256384, checkpoint 97",
                  "hidden_size: config 768, checkpoint 32", "intermediate_size: config 2048, checkpoint 48",
                  "num_hidden_layers: config 12, checkpoint 4", "num_experts: config 16, checkpoint 4",
                  "moe_layer_interval: config 4, checkpoint 2", "attention_width: config 768, checkpoint 64"])


def test_other_bad_inputs(tmp_path, capsys):
    _fails(capsys, tmp_path, tmp_path / "nothing", match=["no T5X msgpack 'checkpoint' file"])
    ckpt, _ = _tiny_checkpoint(tmp_path / "c")
    _fails(capsys, tmp_path, ckpt, "--tokenizer", str(tmp_path / "none.model"), match=["--tokenizer", "no such file"])
    _fails(capsys, tmp_path, ckpt, "--max-shard-size", "lots", match=["--max-shard-size"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    rc = cli.main([str(ckpt), str(tmp_path / "out"), "--head-dim", "16", "--no-progress"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["keep"]


def test_cli_subprocess_exit_code_and_one_line(tmp_path):
    ckpt, _ = _tiny_checkpoint(tmp_path / "c")
    shutil.rmtree(ckpt / "target.token_embedder.embedding")
    r = subprocess.run([sys.executable, str(ROOT / "convert_jax_checkpoint.py"), str(ckpt), str(tmp_path / "o")],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"convert_jax_checkpoint.py: error: token_embedder/embedding: array folder "
        f"{ckpt / 'target.token_embedder.embedding'} is missing"]
    assert not (tmp_path / "o").exists()


# -- memory: peak RSS growth stays far below the checkpoint size ----------------------------------

_MEASURE = """
import resource, sys, psutil
from openmoe.checkpoint import convert
base = psutil.Process().memory_info().rss
try:  # reset the peak to now: ru_maxrss would also count the parent's pages before exec
    open("/proc/self/clear_refs", "w").write("5")
    peak = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
except OSError:
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
convert(sys.argv[1], sys.argv[2], head_dim=64, max_shard_size="16MB", progress=False, fsync=False, log=lambda *_: None)
print(peak() - base)
"""


def _peak_rss_growth(ckpt: Path, out: Path) -> int:
    """Bytes the peak RSS of a fresh process grows by while convert() runs."""
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(ckpt), str(out)], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[-1])


def test_peak_memory_is_bounded_by_the_largest_arrays(tmp_path):
    # ~250 MB of float32 in ~370 arrays of at most 4.2 MB: growth must stay near a few arrays
    cfg = tiny_config(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=32,
                      num_attention_heads=4, head_dim=64, num_experts=4, moe_layer_interval=2)
    params = random_params(cfg, seed=2)
    total = sum(t.numel() * 4 for t in params.values())
    biggest = max(t.numel() * 4 for t in params.values())
    assert 200e6 < total < 300e6 and biggest < 5e6
    ckpt = write_checkpoint(tmp_path / "c", params, chunks=lambda n, s: [max(1, s[0] // 4), *s[1:]])
    del params
    growth = _peak_rss_growth(ckpt, tmp_path / "out")
    # the chunks in flight, malloc's retained buffers: ~35 MB; holding the parameters would be >= 200 MB
    print(f"peak RSS growth {growth / 1e6:.0f} MB")
    assert growth < 0.25 * total, f"peak RSS grew {growth / 1e6:.0f} MB converting {total / 1e6:.0f} MB"
    assert math.isclose(sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors")), total, rel_tol=0.01)


def _patterned(cfg, seed: int = 5) -> dict:
    """Parameters of `cfg`'s shapes filled with a repeated random period: gzip and zlib are
    quick on them, which keeps a few hundred MB of fixture fast to write and to convert."""
    period = torch.randn(4099, generator=torch.Generator().manual_seed(seed))
    out = {}
    for name, shape in t5x_shapes(cfg).items():
        n = math.prod(shape)
        out[name] = period.repeat(n // 4099 + 1)[:n].reshape(shape).clone()
    return out


def _strided_conversion(tmp_path, vocab: int) -> tuple[int, int]:
    """(peak RSS growth, largest tensor) converting a model whose largest tensors (embedding,
    lm_head) are vocab x 1024, stored in chunks of 1/16 of their rows (one per expert for the
    experts). lm_head's kernel is stored [H, V]: its transposed chunks are column blocks of the
    output, which go through TensorSlot's strided path; its first rows are checked after."""
    cfg = tiny_config(vocab_size=vocab, hidden_size=1024, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=4, head_dim=64, num_experts=4, moe_layer_interval=2)
    params = _patterned(cfg)
    largest = max(t.numel() * 4 for t in params.values())

    def chunks(name, shape):
        if "/expert/" in name:
            return [1, *shape[1:]]
        big = name in ("decoder/logits_dense/kernel", "token_embedder/embedding")
        return [max(1, shape[0] // (16 if big else 8)), *shape[1:]]

    ckpt = write_checkpoint(tmp_path / f"c{vocab}", params, chunks=chunks, state=False)
    head = params["decoder/logits_dense/kernel"][:, :5].t().clone()
    del params
    out = tmp_path / f"out{vocab}"
    growth = _peak_rss_growth(ckpt, out)
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())
    with safe_open(out / index["weight_map"]["lm_head.weight"], "pt") as f:
        assert torch.equal(f.get_slice("lm_head.weight")[:5], head)
    shutil.rmtree(out)
    shutil.rmtree(tmp_path / f"c{vocab}")
    return growth, largest


def test_peak_memory_does_not_grow_with_the_largest_tensor(tmp_path):
    # Assembling whole parameters cost two or more of the largest (the former reader: 3.3x);
    # streaming chunks into place with the strided tensor mapped whole held its pages (1.25x the
    # largest, growing with it: 168 -> 487 MB for 134 -> 403 MB); mapped a window of rows at a
    # time, what is held is the chunks in flight and one window (102 -> 128 MB measured, the
    # difference being the larger chunks)
    small, largest_small = _strided_conversion(tmp_path, 32768)
    big, largest_big = _strided_conversion(tmp_path, 98304)
    print(f"peak RSS growth {small / 1e6:.0f} MB and {big / 1e6:.0f} MB, largest tensor "
          f"{largest_small / 1e6:.0f} MB and {largest_big / 1e6:.0f} MB")
    assert largest_small == 128 << 20 and largest_big == 384 << 20
    assert big - small < 0.35 * (largest_big - largest_small), (small, big)  # the old way: 1.2x
    assert big < 0.5 * largest_big, big
