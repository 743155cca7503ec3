"""An independent, deliberately naive OpenMoE forward following docs/openmoe-numerics.md (section 2)
for checking the model: per-head, per-token loops, no HF code, dropless routing."""

import math

import torch


def _rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _mlp(x, wg, wu, wd):  # HF Linear layout [out, in]
    g = x @ wg.t()
    a, b = g[..., : g.shape[-1] // 2], g[..., g.shape[-1] // 2:]
    return (a * b * torch.sigmoid(b) * (x @ wu.t())) @ wd.t()


def _rope(x, pos, d):  # x [d]; rotate-half with the angle table concatenated with itself
    half = d // 2
    out = torch.empty_like(x)
    for j in range(half):
        ang = pos * 10000.0 ** (-2.0 * j / d)
        c, s = math.cos(ang), math.sin(ang)
        out[j] = x[j] * c - x[j + half] * s
        out[j + half] = x[j + half] * c + x[j] * s
    return out


@torch.no_grad()
def reference_logits(sd, cfg, ids):
    """ids: [S] one sequence. Returns [S, V] float32 logits."""
    sd = {k: v.double() for k, v in sd.items()}
    S, nh, d, eps = len(ids), cfg.num_attention_heads, cfg.head_dim, cfg.rms_norm_eps
    x = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        q, k, v = (h @ sd[p + f"self_attn.{n}_proj.weight"].t() for n in "qkv")
        attn = torch.zeros(S, nh * d, dtype=x.dtype)
        for hd in range(nh):
            sl = slice(hd * d, (hd + 1) * d)
            qh = torch.stack([_rope(q[t, sl], t, d) for t in range(S)])
            kh = torch.stack([_rope(k[t, sl], t, d) for t in range(S)])
            scores = qh @ kh.t()  # no 1/sqrt(d)
            scores = scores + torch.triu(torch.full((S, S), -1e10, dtype=x.dtype), 1)
            attn[:, sl] = torch.softmax(scores, -1) @ v[:, sl]
        x = x + attn @ sd[p + "self_attn.o_proj.weight"].t()
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        if (i + 1) % cfg.moe_layer_interval == 0:
            probs = torch.softmax(h @ sd[p + "mlp.gate_weight"].t(), -1)
            y = torch.zeros_like(x)
            for t in range(S):
                pr = probs[t].clone()
                for _ in range(cfg.num_experts_per_tok):
                    e = int(pr.argmax())
                    wg, wu, wo = (sd[p + f"mlp.experts.{n}"][e] for n in ("wi_gate", "wi_up", "wo"))
                    g = h[t] @ wg
                    a, b = g[: g.shape[0] // 2], g[g.shape[0] // 2:]
                    y[t] += probs[t, e] * ((a * b * torch.sigmoid(b) * (h[t] @ wu)) @ wo)
                    pr[e] = -1
            x = x + y
            h = _rms(x, sd[p + "pre_extra_mlp_layernorm.weight"], eps)
            x = x + _mlp(h, *(sd[p + f"extra_mlp.{n}_proj.weight"] for n in ("gate", "up", "down")))
        else:
            x = x + _mlp(h, *(sd[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down")))
    x = _rms(x, sd["model.norm.weight"], eps)
    return (x @ sd["lm_head.weight"].t()).float()
