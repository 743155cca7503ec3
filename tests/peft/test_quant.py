"""QLoRA plumbing on CPU with the plain-torch int8 codec (bitsandbytes' codecs need CUDA): the
expert stacks are stored quantized, dequantized per projection, LoRA trains on top, and the
backward recomputes the dequantized stack instead of keeping it."""

import torch

from openmoe import OpenMoeForCausalLM
from openmoe.moe.experts import OpenMoeExperts
from openmoe.peft import LoraSpec, attach_lora
from openmoe.peft.quant import QuantizedStack, ReferenceInt8, quantize_experts


def test_reference_codec_round_trip_error_is_bounded():
    w = torch.randn(4, 32, 48)
    q = QuantizedStack(w, ReferenceInt8(block=64))
    assert q.packed[0].dtype == torch.int8
    # absmax int8: error at most half a step of each block's scale
    step = w.reshape(-1, 64).abs().amax(1, keepdim=True) / 127
    assert ((q.dequantize() - w).reshape(-1, 64).abs() <= step / 2 + 1e-7).all()


def test_quantized_experts_forward_backward_match_the_dequantized_weights(tiny):
    torch.manual_seed(0)
    m = OpenMoeForCausalLM(tiny(capacity_policy="dropless"))
    ref = OpenMoeForCausalLM(m.config)
    ref.load_state_dict(m.state_dict())
    assert quantize_experts(m, ReferenceInt8()) == 2 * 3
    for ex_q, ex_r in zip((e for e in m.modules() if isinstance(e, OpenMoeExperts)),
                          (e for e in ref.modules() if isinstance(e, OpenMoeExperts))):
        for name, stack in ex_q._quantized.items():
            stub = getattr(ex_q, name)
            assert stub.stride() == (0, 0, 0) and stub.untyped_storage().nbytes() == 4  # no fp32 copy kept
            with torch.no_grad():
                getattr(ex_r, name).copy_(stack.dequantize())  # the reference runs on the same values
    attach_lora(m, LoraSpec(rank=4, targets=("attention", "experts")))
    attach_lora(ref, LoraSpec(rank=4, targets=("attention", "experts")))
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if ".lora_" in k}, strict=False)
    ids = torch.randint(2, 97, (2, 16))
    emb_q = m.model.embed_tokens(ids).detach().requires_grad_(True)
    emb_r = emb_q.detach().clone().requires_grad_(True)
    lq = m(inputs_embeds=emb_q, labels=ids, use_cache=False).loss
    lr = ref(inputs_embeds=emb_r, labels=ids, use_cache=False).loss
    torch.testing.assert_close(lq, lr, rtol=1e-5, atol=1e-5)
    lq.backward()
    lr.backward()
    torch.testing.assert_close(emb_q.grad, emb_r.grad, rtol=1e-4, atol=1e-6)  # dx through the re-dequantized W
    gq = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    gr = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert gq.keys() == gr.keys()
    for n in gq:
        torch.testing.assert_close(gq[n], gr[n], rtol=1e-4, atol=1e-6)
