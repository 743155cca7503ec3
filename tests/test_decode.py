"""Decoding paths of transformers on OpenMoE, each equal to eager greedy decoding:
a static cache, the decode step compiled with fullgraph=True (what `generate` does with a static
cache and a compile config; on CUDA with CUDA graphs), and continuous batching (paged attention,
`generate_batch`), for the t5x and dropless capacity policies."""

import pytest
import torch
from transformers import CompileConfig, GenerationConfig, StaticCache
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from openmoe import OpenMoeForCausalLM

PROMPTS = [[0, 5, 6, 7, 8], [0, 9, 10, 11], [0, 12]]


def _model(tiny, policy):
    torch.manual_seed(0)
    m = OpenMoeForCausalLM(tiny(capacity_policy=policy)).eval()
    with torch.no_grad():  # sharp weights: greedy choices are not near-ties
        for n, p in m.named_parameters():
            if "norm" not in n:
                p.normal_(0, 0.3)
    return m


def _batch():
    ids = torch.tensor([[0, 5, 6, 7, 8], [0, 0, 9, 10, 11]])  # the second left-padded
    return ids, torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])


@pytest.mark.parametrize("policy", ["t5x", "dropless"])
def test_static_cache_compiled_equals_eager(tiny, policy):
    m = _model(tiny, policy)
    ids, mask = _batch()
    ref = m.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    static = m.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(ref, static)
    cc = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    cc._compile_all_devices = True  # generate compiles on accelerators only unless told
    calls = []
    real = torch.compile

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    torch.compile, torch_compile = spy, real
    try:
        out = m.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         cache_implementation="static", compile_config=cc)
    finally:
        torch.compile = torch_compile
    assert calls and calls[0]["fullgraph"] is True  # the decode step really was compiled
    assert torch.equal(ref, out)


@pytest.mark.parametrize("policy", ["t5x", "dropless"])
def test_decode_step_has_no_graph_break(tiny, policy):
    m = _model(tiny, policy)
    ids, mask = _batch()
    cache = StaticCache(config=m.config, max_cache_len=16)
    with torch.no_grad():
        m(ids, attention_mask=mask, cache=cache, use_cache=True)  # prefill
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        explain = torch._dynamo.explain(m.forward)(torch.tensor([[3], [4]]), attention_mask=step_mask,
                                                   position_ids=torch.tensor([[5], [5]]), cache=cache,
                                                   use_cache=True)
    assert explain.graph_break_count == 0, explain.break_reasons


@pytest.mark.parametrize("policy", ["t5x", "dropless"])
def test_continuous_batching_equals_one_by_one(tiny, policy):
    m = _model(tiny, policy)
    ref = [m.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p):].tolist() for p in PROMPTS]
    gc = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=1, pad_token_id=0)
    # a small paged cache: sized from free memory it is slow to set up on a CPU
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=16, max_batch_tokens=64)
    out = m.generate_batch(inputs=PROMPTS, generation_config=gc, continuous_batching_config=cb)
    got = [out[k].generated_tokens for k in sorted(out, key=lambda k: int(k.split("_")[-1]))]
    assert got == ref
