"""Per-rank memory of one training step: weights, gradients, optimizer state, activations, and
the peak, found by walking the step (forward through the layers, backward in reverse, then
the optimizer) the way tensors are created and freed.

Everything comes from the model config (parameters enumerated on the meta device) and the run's
settings; nothing is allocated. What the trainer does is modelled as it is:
  - full fine-tuning keeps fp32 master weights, gradients and optimizer state and runs under
    autocast (bf16 copies of the Linear weights live from forward to their backward);
  - LoRA keeps the frozen base in the compute dtype (or 4/8-bit with QLoRA) and fp32 adapters;
  - AdamW's step makes two fp32 temporaries the size of a parameter (one parameter at a time);
  - the logits stay alive until the step ends (the model output holds them);
  - activation checkpointing keeps each decoder layer's input and recomputes one layer at a
    time in the backward;
  - expert parallelism keeps E / ep experts per rank and adds the all-to-all buffers; FSDP2
    (openmoe/parallel/fsdp.py) shards the non-expert weights, gradients and optimizer state over
    all ranks and adds its all-gather / reduce-scatter buffers (by formula: not measured here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..weight_kinds import DEFAULT_LORA_TARGETS
from .activations import Needs, TokenBytes, kept_assignments
from .layout import Layout
from .params import FREEZE_KINDS, QUANTIZABLE, Param, inventory, lora_targets_of

LINEAR_KINDS = ("attention", "mlp", "extra_mlp", "router", "lm_head")  # what autocast casts
QUANT_BITS = {"4bit": 4 + 8 / 64 + 32 / (64 * 256), "8bit": 8 + 32 / 4096}  # see peft/quant.py
CUDA_CONTEXT = 0.75 * 2 ** 30  # CUDA context and kernels, outside torch's allocator
CUDA_FRAGMENTATION = 0.05  # caching-allocator slack, as a share of the tensors' peak


@dataclass(frozen=True)
class Workload:
    batch: int = 1  # micro-batch per rank
    seq: int = 2048
    compute: str = "bf16"  # bf16 | fp32
    peft: str | None = None  # None (full fine-tuning) | lora
    lora_rank: int = 8
    lora_targets: tuple = tuple(DEFAULT_LORA_TARGETS)
    lora_dropout: float = 0.0
    quantize: str | None = None  # 4bit | 8bit
    optimizer: str = "adamw"
    checkpointing: bool = False
    freeze: tuple = ()
    device: str = "cuda"  # cuda adds the context and allocator allowance

    @property
    def c(self) -> int:
        return 2 if self.compute == "bf16" else 4


@dataclass
class Unit:
    """One stage of the forward: the embedding, a decoder layer, or the head (norm + lm_head + loss)."""

    name: str
    saved: dict = field(default_factory=dict)  # activation part -> bytes kept for the backward
    grads: float = 0.0  # gradients this stage's backward creates
    bwd_buffers: float = 0.0  # gradient buffers alive while this stage runs backward
    transient: dict = field(default_factory=dict)  # buffers live while it runs, forward and backward

    @property
    def kept(self) -> float:
        return sum(self.saved.values())


@dataclass
class MemoryPlan:
    rows: list  # (label, bytes, note)
    peak: float
    peak_at: str
    layout: Layout
    workload: Workload
    params_total: int
    trainable: int

    def fits(self, device_memory: float) -> bool:
        return self.peak <= device_memory


# ---------------------------------------------------------------------------------- parameters
def _trainable_and_lora(params: list[Param], w: Workload) -> tuple[dict, dict]:
    """(name -> trains in full fine-tuning, name -> LoRA parameter count)."""
    if w.peft:
        per_rank = lora_targets_of(params, w.lora_targets)
        return {p.name: False for p in params}, {k: v * w.lora_rank for k, v in per_rank.items()}
    frozen = {k for g in w.freeze for k in FREEZE_KINDS.get(g, ())}
    return {p.name: p.kind not in frozen for p in params}, {}


def _shard(p: Param, lay: Layout) -> int:
    return lay.expert_shard if p.kind == "experts" else lay.dense_shard


def _weight_bytes(p: Param, w: Workload) -> float:
    if not w.peft:
        return 4.0  # fp32 master weights
    if w.quantize and p.kind in QUANTIZABLE:
        return QUANT_BITS[w.quantize] / 8
    return float(w.c)


def _optimizer_bytes(p: Param, numel: float, w: Workload) -> float:
    if w.optimizer == "adafactor":  # factored second moments (torch.optim.Adafactor)
        if len(p.shape) >= 2 and not w.peft:
            lead = numel / (p.shape[-1] * p.shape[-2])
            return 4 * lead * (p.shape[-1] + p.shape[-2])
        return 4 * numel
    return 8 * numel  # AdamW: exp_avg + exp_avg_sq in fp32


# ---------------------------------------------------------------------------------- activations
def _needs(layer_params: list[Param], trains: dict, lora: dict, w: Workload) -> Needs:
    n = Needs()
    for p in layer_params:
        if trains[p.name] or p.name in lora:
            n.trained.add(p.leaf)
            if p.name in lora:
                n.lora[p.leaf] = w.lora_rank
            if p.kind == "norm" and trains[p.name]:
                n.norms_train = True
    return n


class _Stages:
    """Builds the Units of one step: what each stage keeps, the gradients it creates, and its
    buffers."""

    def __init__(self, cfg, params: list[Param], trains: dict, lora: dict, w: Workload, lay: Layout):
        self.cfg, self.w, self.lay, self.trains, self.lora = cfg, w, lay, trains, lora
        self.T = w.batch * w.seq
        self.N = kept_assignments(cfg, self.T)
        self.tb = TokenBytes(cfg, w.c, full=not w.peft, lora_dropout=w.lora_dropout)
        self.grad_of = {p.name: p.numel / _shard(p, lay) * 4 for p in params if trains[p.name]}
        for p in params:
            if p.name in lora:
                self.grad_of[p.name] = self.grad_of.get(p.name, 0) + lora[p.name] / _shard(p, lay) * 4
        # autocast caches a bf16 copy of each trained Linear weight (FSDP2 gathers bf16 itself)
        self.casts = not w.peft and w.c == 2 and lay.fsdp == 1
        self.alive = False  # is the autograd graph started (a trained weight met so far)?

    def cast_bytes(self, ps) -> float:
        # autocast's bf16 copies of fp32 weights, kept for the backward: the Linears', and the expert
        # stacks' (grouped_mm casts them to the autocast dtype: openmoe/moe/experts.py)
        return sum(2 * p.numel / _shard(p, self.lay) for p in ps
                   if self.casts and (p.kind in LINEAR_KINDS or p.kind == "experts"))

    def grads(self, ps) -> float:
        return sum(self.grad_of.get(p.name, 0) for p in ps)

    def embedding(self, ps) -> Unit:
        self.alive = any(self.trains[p.name] for p in ps)
        rope = 2 * self.cfg.head_dim * self.T * (4 if not self.w.peft else self.w.c)
        mask = self.w.batch * self.w.seq ** 2  # packed documents: a [B, 1, S, S] bool mask
        kept = (8 * self.T if self.alive else 0) + rope + mask  # int64 ids for the embedding's grad
        return Unit("embedding", {"embedding, RoPE tables, attention mask": kept}, grads=self.grads(ps))

    def layer(self, i: int, ps) -> Unit:
        cfg, tb, T, N = self.cfg, self.tb, self.T, self.N
        n = _needs(ps, self.trains, self.lora, self.w)
        moe = cfg.is_moe_layer(i)
        s = {"norms + residual stream": tb.norm(self.alive, n.norms_train, sum(map(n, ("q_proj", "k_proj", "v_proj"))))}
        s["attention"] = tb.attention(self.alive, n)
        self.alive = self.alive or bool(s["attention"]) or n.norms_train
        if moe:
            router_alive = self.alive or n("gate_weight")
            s["norms + residual stream"] += tb.norm(self.alive, n.norms_train, int(n("gate_weight")))
            s["MoE router"] = tb.router(self.alive, n) * T
            in_graph = router_alive or n.any("wi_gate", "wi_up", "wo")
            s["MoE experts + dispatch/combine"] = (tb.experts(self.alive, n) + tb.combine(router_alive)) * N \
                if in_graph else 0
            self.alive = self.alive or in_graph
        s["norms + residual stream"] += tb.norm(self.alive, n.norms_train, sum(map(n, ("gate_proj", "up_proj"))))
        s["extra MLP" if moe else "dense MLP"] = tb.mlp(self.alive, n) * T
        self.alive = self.alive or any(s.values())
        s["norms + residual stream"] *= T
        s["attention"] *= T
        s["autocast weight copies"] = self.cast_bytes(ps)
        u = Unit(f"layer {i}{' (MoE)' if moe else ''}", s, grads=self.grads(ps))
        if self.alive:  # the residual gradient in and out (fp32), two of the widest ones (the gate's)
            widest = max(2 * cfg.intermediate_size * self.w.c * T, 2 * cfg.intermediate_size * tb.e * N if moe else 0)
            u.bwd_buffers = 2 * 4 * cfg.hidden_size * T + 2 * widest
        if moe and self.lay.ep > 1:
            u.transient["expert-parallel all-to-all buffers"] = 2 * N * cfg.hidden_size * tb.e
        if moe and self.w.quantize:  # QLoRA: one expert stack dequantized at a time (peft/quant.py)
            stacks = [p.numel / _shard(p, self.lay) for p in ps if p.kind == "experts"]
            u.transient["dequantized expert stack (QLoRA)"] = max(stacks) * self.w.c
        return u

    def head(self, ps) -> Unit:
        n = _needs(ps, self.trains, self.lora, self.w)
        T, V = self.T, self.cfg.vocab_size
        s = {"norms + residual stream": self.tb.norm(True, n.norms_train, int(n("lm_head"))) * T,
             "logits + loss": self.tb.loss() * T, "autocast weight copies": self.cast_bytes(ps)}
        # the loss's backward: one fp32 logits-sized gradient (openmoe/losses.py builds it in
        # place), its cast to the compute dtype for lm_head, and the hidden state's gradient
        cast = self.w.c * V * T if self.w.c < 4 else 0
        return Unit("head (norm, lm_head, loss)", s, grads=self.grads(ps),
                    bwd_buffers=4 * V * T + cast + 4 * self.cfg.hidden_size * T)


def _units(cfg, params: list[Param], trains: dict, lora: dict, w: Workload, lay: Layout) -> list[Unit]:
    by_layer: dict = {}
    for p in params:
        by_layer.setdefault(p.layer, []).append(p)
    top = by_layer.get(None, [])
    st = _Stages(cfg, params, trains, lora, w, lay)
    units = [st.embedding([p for p in top if p.kind == "embedding"])]
    units += [st.layer(i, by_layer[i]) for i in range(cfg.num_hidden_layers)]
    return units + [st.head([p for p in top if p.kind != "embedding"])]


# ---------------------------------------------------------------------------------- the step
def _fsdp_buffers(params: list[Param], w: Workload, lay: Layout) -> float:
    """FSDP2 (openmoe/parallel/fsdp.py: one unit per decoder layer plus the root, and with
    experts sharded over dp one more per MoE layer's expert block): the root's weights gathered
    in the compute dtype for the whole step, two units gathered at a time (one prefetched), and,
    when the weights train, the unsharded fp32 gradients of the largest unit before its
    reduce-scatter."""
    units: dict = {}
    for p in params:
        if p.kind != "experts":
            key = p.layer if p.layer is not None else "root"
            units[key] = units.get(key, 0) + p.numel
        elif lay.experts_fsdp_sharded:  # this rank's E/ep block, gathered over dp
            key = ("experts", p.layer)
            units[key] = units.get(key, 0) + p.numel / lay.ep
    root = units.pop("root", 0)
    layer = max(units.values(), default=0)
    return w.c * (root + 2 * layer) + (0 if w.peft else 4 * max(root, layer))


def _checkpointing(units: list[Unit], w: Workload, cfg) -> tuple[list, list, float]:
    """(kept after the forward, live during its own backward) per stage, and the autocast
    copies the forward holds at once. Without checkpointing both are what the stage keeps; with
    it a decoder layer keeps its input and recomputes the rest during its backward (under
    autocast, the cast weights of the whole forward stay cached until the forward ends)."""
    if not w.checkpointing:
        return [u.kept for u in units], [u.kept for u in units], 0.0
    hidden = w.batch * w.seq * cfg.hidden_size * (2 if w.peft and w.c == 2 else 4)
    kept, live = [], []
    for u in units:
        is_layer = u.name.startswith("layer")
        k = (hidden if u.kept else 0) if is_layer else u.kept
        kept.append(k)
        live.append(k + u.kept if is_layer else u.kept)
    casts = sum(u.saved.get("autocast weight copies", 0) for u in units if u.name.startswith("layer"))
    return kept, live, casts


def _walk(units: list[Unit], kept: list, live: list, casts: float, static: float, step_tmp: float,
          logits: float) -> tuple[float, str]:
    """Peak over the step and where it happens. Forward: kept activations accumulate. Backward,
    last stage first: a stage's live activations and gradient buffers coexist with the earlier
    stages' activations and the later stages' gradients; the logits stay alive (the model
    output holds them). Step: all gradients, the logits and the optimizer's temporaries."""
    best = (0.0, "")
    total = static
    for u, k in zip(units, kept):
        total += k
        best = max(best, (total + casts + sum(u.transient.values()), f"forward, {u.name}"))
    grads_done = 0.0
    for i in range(len(units) - 1, -1, -1):
        u = units[i]
        held_logits = logits if i < len(units) - 1 else 0.0
        cur = static + sum(kept[:i]) + live[i] + u.bwd_buffers + sum(u.transient.values()) + grads_done \
            + u.grads + held_logits
        best = max(best, (cur, f"backward, {u.name}"))
        grads_done += u.grads
    return max(best, (static + grads_done + logits + step_tmp, "optimizer step (gradients + optimizer temporaries)"))


def _state_rows(params: list[Param], trains: dict, lora: dict, w: Workload, lay: Layout):
    """Rows for weights, LoRA adapter, gradients, optimizer state and its step's temporaries;
    returns (rows, bytes held for the whole step, step temporaries)."""
    local = {p.name: p.numel / _shard(p, lay) for p in params}
    weights = sum(local[p.name] * _weight_bytes(p, w) for p in params)
    lora_local = {n: c / _shard(next(q for q in params if q.name == n), lay) for n, c in lora.items()}
    lora_w = 4 * sum(lora_local.values())
    trained = [p for p in params if trains[p.name]]
    grads = 4 * sum(local[p.name] for p in trained) + lora_w
    opt = sum(_optimizer_bytes(p, local[p.name], w) for p in trained) + (2 if w.optimizer == "adamw" else 1) * lora_w
    what = "fp32 master" if not w.peft else (f"{w.quantize} base" if w.quantize else f"{w.compute} base")
    rows = [("parameters", weights, what + f", dense /{lay.dense_shard}, experts /{lay.expert_shard}")]
    if w.peft:
        rows.append((f"LoRA adapter (r={w.lora_rank}, fp32)", lora_w, f"{sum(lora.values()) / 1e6:.2f}M parameters"))
    rows += [("gradients", grads, "fp32, trainable only"), ("optimizer state", opt, w.optimizer)]
    # The trainer's AdamW is the fused kernel (in place, no temporaries) unless FSDP2 shards the
    # dense part: then the per-tensor loop makes sqrt(v) and its quotient in fp32, one parameter
    # at a time (openmoe/training/optim.py). Adafactor: its second-moment estimate, update, copy.
    largest = max([local[p.name] for p in trained] + list(lora_local.values()) + [0])
    fused = w.optimizer == "adamw" and lay.fsdp == 1
    step_tmp = 0.0 if fused else (8 if w.optimizer == "adamw" else 12) * largest
    how = "fused AdamW: in place" if fused else f"{w.optimizer} on the largest trainable tensor"
    rows.append(("optimizer-step temporaries", step_tmp, how))
    return rows, weights + lora_w + opt, step_tmp


def _activation_rows(units: list[Unit], cfg, w: Workload) -> list:
    parts: dict = {}
    for u in units:
        for k, v in u.saved.items():
            parts[k] = parts.get(k, 0) + v
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    counts = {"attention": cfg.num_hidden_layers, "dense MLP": cfg.num_hidden_layers - moe_layers,
              "MoE router": moe_layers, "MoE experts + dispatch/combine": moe_layers, "extra MLP": moe_layers}
    rows = []
    for k, v in parts.items():
        if v or k in ("attention", "MoE experts + dispatch/combine"):
            label = f"activations: {k}" + (f" (x{counts[k]})" if k in counts else "")
            layered = w.checkpointing and k not in ("logits + loss", "embedding, RoPE tables, attention mask")
            rows.append((label, v, "recomputed in the backward, one layer at a time (sum shown)" if layered
                         else "kept for the backward"))
    if w.checkpointing:
        rows.append(("activations: checkpointed layer inputs", cfg.num_hidden_layers * w.batch * w.seq *
                     cfg.hidden_size * (4 if not w.peft or w.c == 4 else 2), "one hidden state per layer"))
    for label, note in (("expert-parallel all-to-all buffers", "send + receive of one MoE layer"),
                        ("dequantized expert stack (QLoRA)", "one [E, H, 2I] stack in the compute dtype")):
        b = max(u.transient.get(label, 0) for u in units)
        if b:
            rows.append((label, b, note + ", transient"))
    return rows


def _rows_value(rows: list, label: str) -> float:
    return next(b for lab, b, _ in rows if lab == label)


def load_time_host_bytes(config, layout: Layout | None = None, fresh: bool = True) -> float:
    """Host bytes per rank while the trainer materialises a meta-built model (full fine-tuning,
    openmoe/parallel/materialize.py): its own fp32 shards, plus (fresh init) one full fp32 tensor,
    the largest, which every rank draws whole before keeping its slice. init_from reads only the
    slices (safetensors get_slice): its own shards. On a GPU the shards live on the device; the
    one full tensor is what the host holds."""
    lay = (layout or Layout()).check(config.num_experts)
    params = inventory(config)
    own = sum(4.0 * p.numel / _shard(p, lay) for p in params)
    return own + (4.0 * max(p.numel for p in params) if fresh else 0.0)


def plan_memory(config, w: Workload, layout: Layout | None = None) -> MemoryPlan:
    """The per-rank plan of one training step of `config` under workload `w` and `layout`."""
    lay = (layout or Layout()).check(config.num_experts)
    params = inventory(config)
    trains, lora = _trainable_and_lora(params, w)
    rows, static, step_tmp = _state_rows(params, trains, lora, w, lay)
    units = _units(config, params, trains, lora, w, lay)
    rows += _activation_rows(units, config, w)
    if lay.fsdp > 1:
        buf = _fsdp_buffers(params, w, lay)
        rows.append(("FSDP2 all-gather / reduce-scatter buffers", buf,
                     "root (embedding, lm_head) + 2 layers gathered, one unit's fp32 grads (formula)"))
        static += buf
    logits = 4 * config.vocab_size * w.batch * w.seq  # the model output holds them to the step's end
    kept, live, casts = _checkpointing(units, w, config)
    peak, at = _walk(units, kept, live, casts, static, step_tmp, logits)
    if w.quantize:  # the expert stacks arrive in the compute dtype and are quantized after loading
        experts = sum(p.numel / _shard(p, lay) for p in params if p.kind == "experts")
        load = _rows_value(rows, "parameters") + experts * (w.c - QUANT_BITS[w.quantize] / 8)
        rows.append(("load-time peak (QLoRA)", load, "base loaded with the experts not yet quantized"))
        peak, at = max((peak, at), (load, "loading (experts not yet quantized)"))
    elif not w.peft:  # built on meta, each rank materialises its shards: below the step's peak
        rows.append(("load-time peak (host, fresh init)", load_time_host_bytes(config, lay),
                     "own fp32 shards + the largest full tensor, drawn whole then sliced"))
    if w.device.startswith("cuda"):
        allowance = CUDA_CONTEXT + CUDA_FRAGMENTATION * peak
        rows.append(("CUDA context + allocator slack", allowance, "allowance: 0.75 GiB + 5% of the peak"))
        peak += allowance
    n_train = sum(p.numel for p in params if trains[p.name]) + sum(lora.values())
    return MemoryPlan(rows, peak, at, lay, w, sum(p.numel for p in params), n_train)
