"""Sparse upcycling (Komatsuzaki et al., 2022, arXiv:2212.05055): turn a dense HF causal LM into
a mixture of experts whose experts all start as copies of the dense MLP.

    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2-0.5B")
    upcycle(model, num_experts=8, top_k=2, every=2)       # in place; returns the model
    out = model(input_ids, labels=labels)
    loss = out.loss + moe_loss(model)                     # + weighted aux / z losses of all MoE layers
    model.save_pretrained("moe-ckpt")                     # the spec travels in config.json
    model = load_upcycled("moe-ckpt")                     # dense arch from config + upcycle + weights
    model = AutoModelForCausalLM.from_pretrained("moe-ckpt", trust_remote_code=True)  # the same

Saved folders carry their loading code (../modeling_upcycled.py, bundled by ../remote_code.py)
and config.json says model_type "openmoe_upcycled", so transformers refuses to load them without
trust_remote_code=True rather than building the dense model with random MLPs. The base
architecture must be one transformers knows (built in, or registered with AutoConfig /
AutoModelForCausalLM in the loading process); loading refuses otherwise.

Supported MLPs (found as `layer.mlp` in the decoder's ModuleList, e.g. model.model.layers or
model.transformer.h):
  gated      gate_proj / up_proj / down_proj / act_fn, no biases (Llama, Qwen2/3, Mistral, ...):
             SwiGLU experts when act_fn is SiLU, else the same gated stack with the model's act_fn.
  two-layer  c_fc / c_proj / act (+ dropout) (GPT-2, Conv1D or Linear), fc1 / fc2 / activation_fn
             (Phi), fc_in / fc_out / act: "mlp" experts with the model's own activation module and
             biases. GPT-2's dropout acts on the MLP *output*, so UpcycledMoE applies it after the
             combine (MLPExperts' dropout would act on the hidden activations: a different model).

Exactness before training. With norm_topk_prob=True (the k chosen weights sum to 1), dropless
capacity and identical experts, every token gets sum_k w_k * f(x) = f(x): the upcycled model
computes the dense model's function (to float rounding; the combine runs in float32). It does not
when
  - norm_topk_prob=False: a token gets (p_1 + ... + p_k) * f(x), about k/E of the MLP output with a
    fresh router (0.25 for top-2 of 8): the paper's initial quality dip;
  - capacity drops (t5x / colossalai policies): a dropped assignment contributes 0, so the token
    gets less than f(x) (nothing but the residual if all its choices are dropped).
Router noise does not break it: it only changes which identical experts are chosen.

Router init: small normal (std 0.02, flaxformer's router default; the paper trains the new router
from a random init). Zeros would be a trap: all logits equal, ties go to the lowest expert indices,
so every token picks experts 0..k-1, and experts whose router rows are equal get equal gradients:
they would stay equal forever (only noise could split them). A random router splits the tokens
from step one, so the experts see different data and diverge. Note that with norm_topk_prob=True and
identical experts the task loss sends *no* gradient to the router at first (the output does not
depend on the weights); it learns from the aux / z losses until the experts have diverged (one step).

Which layers: every=N upcycles decoder layers i with i % N == N - 1 (every=2: layers 1, 3, 5, ...,
the paper's / Switch's "every other layer"; every=1: all), or pass layers=[...] explicitly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .expert_types import GatedExperts  # noqa: F401 (importable from here, as before)
from .layer import MoELayer, MoEOutput
from .noise import RouterNoise
from .router import CapacityPolicy

CONFIG_KEY = "openmoe_upcycle"  # config attribute (and config.json field) holding the spec
SPEC_VERSION = 1
# config.json's model_type in saved folders: unknown to transformers, so only the folder's remote
# code (auto_map) loads it; the base model_type is spec["base_model_type"].
UPCYCLED_MODEL_TYPE = "openmoe_upcycled"

__all__ = ["upcycle", "load_upcycled", "moe_loss", "moe_outputs", "UpcycledMoE", "GatedExperts",
           "CONFIG_KEY", "UPCYCLED_MODEL_TYPE"]


# ---------------------------------------------------------------------------------------------
# The replacement module


class UpcycledMoE(nn.Module):
    """Drop-in for a dense MLP: hidden_states [B, S, H] -> [B, S, H].

    Per-call state, in this one place. HF decoder layers pass only a tensor on from their MLP, so
    the MoE statistics and losses of a call cannot travel back through the model's output: each
    forward stores its MoEOutput in `last_output`, replacing the previous call's (None before the
    first call, and after a deepcopy or pickle). Read them after the model's forward with
    moe_outputs(model) / moe_loss(model). Code that calls the layer itself takes them as a value
    instead: forward_with_output. No other MoE module keeps per-call state; MoELayer returns it.
    """

    def __init__(self, moe: MoELayer, dropout: float = 0.0):
        super().__init__()
        self.moe = moe
        self.dropout = nn.Dropout(dropout)  # the dense MLP's output dropout (GPT-2), 0 otherwise
        self.last_output: MoEOutput | None = None

    def forward_with_output(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, MoEOutput]:
        """The MLP's output and this call's MoEOutput, keeping nothing."""
        y_BSH, out = self.moe(hidden_states)
        return self.dropout(y_BSH), out

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        y_BSH, self.last_output = self.forward_with_output(hidden_states)
        return y_BSH

    def __getstate__(self):
        # last_output holds non-leaf tensors of the last graph: deepcopy / pickle would fail on them.
        return {**self.__dict__, "last_output": None}


def moe_outputs(model: nn.Module) -> dict[str, MoEOutput]:
    """Last-call MoEOutput of every UpcycledMoE, by module name (layers not yet run are left out)."""
    return {name: m.last_output for name, m in model.named_modules()
            if isinstance(m, UpcycledMoE) and m.last_output is not None}


def moe_loss(model: nn.Module) -> torch.Tensor:
    """Sum over MoE layers of the last forward's coefficient-weighted aux + z loss (a 0 tensor when
    there is none, e.g. after a no_grad forward in eval mode): add it to the task loss.

    Gradient checkpointing: use the non-reentrant kind (HF's default); the reentrant kind runs the
    forward under no_grad, so these losses would carry no gradient (a warning says so)."""
    losses = [o.loss for o in moe_outputs(model).values() if o.loss is not None]
    if not losses:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")
    if torch.is_grad_enabled() and not any(loss.requires_grad for loss in losses):
        warnings.warn("moe_loss: the MoE losses carry no gradient (forward under no_grad, or "
                      "reentrant gradient checkpointing: use use_reentrant=False)", stacklevel=2)
    total = losses[0]
    for loss in losses[1:]:  # layers may sit on different devices
        total = total + loss.to(total.device)
    return total


# ---------------------------------------------------------------------------------------------
# Reading a dense MLP


@dataclass
class _DenseMLP:
    kind: str  # the expert type (expert_types.EXPERT_TYPES): "swiglu" | "gated" | "mlp"
    weights: dict[str, torch.Tensor]  # expert stack name -> the dense tensor in [in, out] layout
    act: Callable | None  # the dense activation (None for swiglu: F.silu is built in)
    hidden_size: int
    intermediate_size: int
    bias: bool
    dropout: float
    device: torch.device
    dtype: torch.dtype


def _is_conv1d(mod) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(mod, Conv1D)


def _in_out(mod: nn.Module) -> torch.Tensor:
    """Weight as [in, out] (a view): HF Conv1D stores it so, nn.Linear as [out, in]."""
    return mod.weight if _is_conv1d(mod) else mod.weight.t()


def _is_projection(mod) -> bool:
    return isinstance(mod, nn.Linear) or _is_conv1d(mod)


def _is_silu(act) -> bool:
    from transformers.activations import SiLUActivation

    return isinstance(act, (nn.SiLU, SiLUActivation)) or act is F.silu


def _read_gated(mlp: nn.Module, where: str) -> _DenseMLP:
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    if not all(isinstance(m, nn.Linear) for m in (gate, up, down)):
        raise ValueError(f"{where}: gate_proj / up_proj / down_proj must be nn.Linear")
    if any(m.bias is not None for m in (gate, up, down)):
        raise ValueError(f"{where}: the gated MLP has biases (e.g. mlp_bias=True); the gated expert "
                         "stacks have none, so the upcycled model could not equal the dense one")
    silu = _is_silu(mlp.act_fn)
    w = gate.weight
    return _DenseMLP("swiglu" if silu else "gated",
                     {"w_gate": _in_out(gate), "w_up": _in_out(up), "w_down": _in_out(down)},
                     None if silu else mlp.act_fn, gate.in_features, gate.out_features, False, 0.0,
                     w.device, w.dtype)


_TWO_LAYER_NAMES = (("c_fc", "c_proj", "act"), ("fc1", "fc2", "activation_fn"), ("fc_in", "fc_out", "act"))


def _read_two_layer(mlp: nn.Module, names: tuple[str, str, str], where: str) -> _DenseMLP:
    fc_in, fc_out, act = (getattr(mlp, n) for n in names)
    if not (_is_projection(fc_in) and _is_projection(fc_out)):
        raise ValueError(f"{where}: {names[0]} / {names[1]} must be nn.Linear or transformers Conv1D")
    bias = fc_in.bias is not None
    if (fc_out.bias is not None) != bias:
        raise ValueError(f"{where}: {names[0]} and {names[1]} must both have a bias or neither")
    w_in_HI, w_out_IH = _in_out(fc_in), _in_out(fc_out)
    weights = {"w_in": w_in_HI, "w_out": w_out_IH}
    if bias:
        weights.update(b_in=fc_in.bias, b_out=fc_out.bias)
    drop = getattr(mlp, "dropout", None)
    return _DenseMLP("mlp", weights, act, w_in_HI.shape[0], w_in_HI.shape[1], bias,
                     drop.p if isinstance(drop, nn.Dropout) else 0.0, w_in_HI.device, w_in_HI.dtype)


def _read_mlp(mlp: nn.Module, where: str) -> _DenseMLP:
    if isinstance(mlp, UpcycledMoE):
        raise ValueError(f"{where} is already upcycled")
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return _read_gated(mlp, where)
    for names in _TWO_LAYER_NAMES:
        if all(hasattr(mlp, n) for n in names):
            return _read_two_layer(mlp, names, where)
    raise ValueError(f"{where}: {type(mlp).__name__} is not a recognized dense MLP (expected "
                     "gate_proj/up_proj/down_proj/act_fn, c_fc/c_proj/act, fc1/fc2/activation_fn "
                     "or fc_in/fc_out/act)")


# ---------------------------------------------------------------------------------------------
# Finding the decoder layers


def _find_layers(model: nn.Module, layers_path: str | None) -> tuple[str, nn.ModuleList]:
    """The decoder's ModuleList: `layers_path` if given, else the one ModuleList whose every
    element has an `mlp` (model.layers, transformer.h, ...)."""
    if layers_path is not None:
        try:
            found = model.get_submodule(layers_path)
        except AttributeError as err:
            raise ValueError(f"layers_path={layers_path!r} is not a submodule of the model") from err
        if not isinstance(found, nn.ModuleList):
            raise ValueError(f"layers_path={layers_path!r} is a {type(found).__name__}, not a ModuleList")
        return layers_path, found
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and all(hasattr(l, "mlp") for l in m)]
    if not candidates:
        raise ValueError(f"{type(model).__name__}: no decoder layers with an `mlp` found (no "
                         "recognizable MLPs to upcycle); pass layers_path= if they are elsewhere")
    if len(candidates) > 1:
        names = [n for n, _ in candidates]
        raise ValueError(f"{type(model).__name__}: several layer lists have an `mlp` ({names}); "
                         "pass layers_path= to choose one")
    return candidates[0]


def _select(num_layers: int, every: int, layers: Iterable[int] | None) -> list[int]:
    if layers is not None:
        layers = list(layers)
        if every != 1:
            raise ValueError(f"every={every} and layers={layers!r}: pass every or layers, not both")
        chosen = sorted(set(int(i) for i in layers))
        if not chosen or any(not 0 <= i < num_layers for i in chosen):
            raise ValueError(f"layers={layers!r}: need indices in [0, {num_layers})")
        return chosen
    chosen = [i for i in range(num_layers) if i % every == every - 1]
    if not chosen:
        raise ValueError(f"every={every} selects none of the model's {num_layers} layers")
    return chosen


# ---------------------------------------------------------------------------------------------
# The spec (what config.json stores) and building the MoE from it


def _encode(value):
    """capacity / noise as JSON: strings, floats and None as they are, dataclasses as dicts."""
    if isinstance(value, (CapacityPolicy, RouterNoise)):
        return {"type": type(value).__name__, **{f.name: getattr(value, f.name)
                                                  for f in dataclasses.fields(value)}}
    return value


def _decode(value):
    if isinstance(value, dict):
        kinds = {"CapacityPolicy": CapacityPolicy, "RouterNoise": RouterNoise}
        fields = dict(value)
        return kinds[fields.pop("type")](**fields)
    return value


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def _build_moe(dense: _DenseMLP, spec: dict) -> UpcycledMoE:
    """An UpcycledMoE shaped for `dense`, on its device and dtype, weights uninitialized.

    Built on the meta device, then allocated once (no E-fold random init to throw away)."""
    E, H, I = spec["num_experts"], dense.hidden_size, dense.intermediate_size
    with torch.device("meta"):
        # the activation is a placeholder where the dense MLP has its own (set below)
        moe = MoELayer(H, E, spec["top_k"], experts=dense.kind, intermediate_size=I,
                       capacity=_decode(spec["capacity"]), noise=_decode(spec["noise"]),
                       aux_loss=spec["aux_loss"], z_loss=spec["z_loss"],
                       norm_topk_prob=spec["norm_topk_prob"], activation=F.silu, bias=dense.bias,
                       dropout=0.0, experts_implementation=spec["experts_implementation"])
    moe = moe.to(dense.dtype).to_empty(device=dense.device)
    if dense.act is not None:
        # after to_empty: an activation with parameters (xIELU) keeps its values
        moe.experts.act = copy.deepcopy(dense.act)
    return UpcycledMoE(moe, dense.dropout)


@torch.no_grad()
def _init_from_dense(up: UpcycledMoE, dense: _DenseMLP, std: float, gen: torch.Generator | None) -> None:
    for name, w in dense.weights.items():
        stack = getattr(up.moe.experts, name)
        stack.copy_(w.unsqueeze(0).expand_as(stack))  # every expert = the dense MLP
    gate_EH = up.moe.gate_weight
    if std == 0:
        gate_EH.zero_()
    else:  # drawn in float32 on the CPU: the same router for a seed whatever the device/dtype
        gate_EH.copy_(torch.randn(gate_EH.shape, generator=gen) * std)


def _apply(model: nn.Module, spec: dict, init: tuple[float, torch.Generator | None] | None) -> None:
    """Replace the MLPs of spec["layers"]; `init` = (router std, generator) copies the dense
    weights, None leaves them for a checkpoint to fill. Reads every MLP before changing any."""
    _, layer_list = _find_layers(model, spec["layers_path"])
    for i in spec["layers"]:
        if i >= len(layer_list):
            raise ValueError(f"upcycle spec names layer {i}, the model has {len(layer_list)}")
    dense = {i: _read_mlp(layer_list[i].mlp, f"layer {i} mlp") for i in spec["layers"]}
    for i, d in dense.items():
        up = _build_moe(d, spec)
        if init is not None:
            _init_from_dense(up, d, *init)
        up.train(layer_list[i].mlp.training)
        layer_list[i].mlp = up


def upcycle(model: nn.Module, *, num_experts: int = 8, top_k: int = 2, every: int = 1,
            layers: Iterable[int] | None = None, capacity: CapacityPolicy | str | float = "dropless",
            aux_loss: float = 0.01, z_loss: float = 0.001, noise: RouterNoise | str | None = None,
            norm_topk_prob: bool = True, router_init_std: float = 0.02,
            experts_implementation: str = "auto", layers_path: str | None = None,
            seed: int | None = None) -> nn.Module:
    """Sparse-upcycle `model` in place (and return it): the MLPs of the chosen decoder layers become
    UpcycledMoE modules with `num_experts` copies of the dense MLP and a new router.

    num_experts, top_k: experts per layer and experts per token (1 <= top_k <= num_experts).
    every:              upcycle layers i with i % every == every - 1 (1: all; 2: 1, 3, 5, ...).
    layers:             explicit layer indices instead of `every`.
    capacity:           "dropless" (default; exact at init), "t5x", "colossalai", a capacity factor
                        or a CapacityPolicy (drops make the output differ from the dense model's).
    aux_loss, z_loss:   coefficients of the load-balance and router z losses in moe_loss(model)
                        (0.01 and 0.001, the Switch / ST-MoE values the paper trains with).
    noise:              router noise in training: None, "jitter", "gaussian" or a RouterNoise.
    norm_topk_prob:     renormalize the chosen weights to sum 1 (default; exact at init).
    router_init_std:    std of the router's normal init (0 gives zeros: see the module docstring).
    layers_path:        dotted path of the decoder ModuleList if it cannot be found automatically.
    seed:               seed of the router init (default: torch's global RNG).

    The spec is stored as model.config.openmoe_upcycle, so model.save_pretrained(dir) writes a
    folder that load_upcycled(dir) rebuilds.
    """
    _check_int("num_experts", num_experts, 1)
    _check_int("every", every, 1)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k!r} must be an integer in [1, num_experts={num_experts}]")
    if not router_init_std >= 0:
        raise ValueError(f"router_init_std={router_init_std!r} must be >= 0")
    config = getattr(model, "config", None)
    if config is not None and getattr(config, CONFIG_KEY, None) is not None:
        raise ValueError(f"the model is already upcycled (config.{CONFIG_KEY} is set)")
    path, layer_list = _find_layers(model, layers_path)
    spec = {
        "version": SPEC_VERSION,
        "layers_path": path,
        "layers": _select(len(layer_list), every, layers),
        "num_experts": num_experts,
        "top_k": top_k,
        "capacity": _encode(capacity),
        "noise": _encode(noise),
        "aux_loss": float(aux_loss),
        "z_loss": float(z_loss),
        "norm_topk_prob": bool(norm_topk_prob),
        "experts_implementation": experts_implementation,
        "base_model_type": getattr(config, "model_type", None),
    }
    json.dumps(spec)  # fail here, not in save_pretrained, if something is not serializable
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    _apply(model, spec, (router_init_std, gen))
    if config is not None:
        setattr(config, CONFIG_KEY, spec)
    _mark_upcycled(model)
    return model


# ---------------------------------------------------------------------------------------------
# Saving: config.json marked upcycled, the loading code beside the weights


class _SavesUpcycled:
    """Mixed into the model's class by _mark_upcycled: save_pretrained also marks the folder."""

    _base_class: type  # the model's own class (LlamaForCausalLM, ...)

    def save_pretrained(self, save_directory, *args, **kwargs):
        if kwargs.get("push_to_hub"):  # transformers would upload before the folder is marked
            raise ValueError("upcycled models: save_pretrained(push_to_hub=True) is not supported; "
                             "use model.push_to_hub(repo_id), which saves through save_pretrained")
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            _mark_folder(save_directory)

    def __reduce_ex__(self, protocol):
        # pickle names classes by module + name, and this one is made at run time: name the base
        # class and mark the object again on load (deepcopy goes through here too)
        return _new_marked, (self._base_class,), self.__getstate__()


_SAVING_CLASSES: dict[type, type] = {}


def _mark_upcycled(model: nn.Module) -> None:
    """Swap the model's class for a subclass whose save_pretrained marks the folder. The subclass
    keeps the base class's name: save_pretrained writes it to config.json's `architectures`."""
    from transformers import PreTrainedModel

    cls = type(model)
    if not isinstance(model, PreTrainedModel) or issubclass(cls, _SavesUpcycled):
        return
    if cls not in _SAVING_CLASSES:
        _SAVING_CLASSES[cls] = type(cls.__name__, (_SavesUpcycled, cls),
                                    {"__qualname__": cls.__qualname__, "_base_class": cls})
    model.__class__ = _SAVING_CLASSES[cls]


def _new_marked(cls: type) -> nn.Module:
    model = cls.__new__(cls)
    _mark_upcycled(model)
    return model


def _mark_folder(save_directory: str | os.PathLike) -> None:
    """config.json: model_type -> UPCYCLED_MODEL_TYPE and auto_map -> the bundled loader, which is
    written beside it. Without this the folder would load as the dense base model."""
    from ..remote_code import UPCYCLED_AUTO_MAP, write_remote_code

    path = os.path.join(save_directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["model_type"] = UPCYCLED_MODEL_TYPE
    config["auto_map"] = dict(UPCYCLED_AUTO_MAP)
    write_remote_code(save_directory, "upcycled")
    tmp = path + ".tmp"  # temp + rename: never a half-written config.json
    with open(tmp, "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Loading


_MODEL_KWARGS = ("attn_implementation",)
# from_pretrained arguments with nothing to do here (AutoModelForCausalLM passes some of them to
# the remote code's from_pretrained): the base architecture is a known one, never remote code.
_IGNORED_KWARGS = ("trust_remote_code", "code_revision", "adapter_kwargs", "_from_auto", "_from_pipeline")
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only")


def _local_folder(path: str | os.PathLike, hub_kwargs: dict) -> str:
    if os.path.isdir(path):
        return str(path)
    from huggingface_hub import snapshot_download

    return snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors"], **hub_kwargs)


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ValueError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                     "(save the upcycled model with save_pretrained, which writes safetensors)")


def _load_weights(model: nn.Module, files: list[str]) -> None:
    """Load the shards one at a time; every model key must come from the files, except keys tied
    to a loaded one (GPT-2's lm_head.weight is wte.weight and is not saved)."""
    from safetensors.torch import load_file

    expected = model.state_dict()
    loaded: set[str] = set()
    for path in files:
        shard = load_file(path)
        unknown = sorted(k for k in shard if k not in expected)
        if unknown:
            raise ValueError(f"{os.path.basename(path)}: unknown keys for the upcycled model: {unknown}")
        wrong = [f"{k} {list(v.shape)} vs {list(expected[k].shape)}" for k, v in shard.items()
                 if v.shape != expected[k].shape]
        if wrong:
            raise ValueError(f"{os.path.basename(path)}: shape mismatches (file vs model): {wrong}")
        model.load_state_dict(shard, strict=False)
        loaded.update(shard)
    owner = {name: id(t) for name, t in model.named_parameters(remove_duplicate=False)}
    owner.update({name: id(t) for name, t in model.named_buffers(remove_duplicate=False)})
    loaded_ids = {owner.get(k) for k in loaded}
    missing = sorted(k for k in expected if k not in loaded and owner.get(k) not in loaded_ids)
    if missing:
        raise ValueError(f"keys missing from the checkpoint: {missing}")


def _base_config(config_dict: dict, path, overrides: dict):
    """The base architecture's config (LlamaConfig, ...) and the spec, from a config.json dict:
    a marked folder's, or an older folder's that kept the base model_type."""
    from transformers import CONFIG_MAPPING

    spec = config_dict.get(CONFIG_KEY)
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: config.json has no {CONFIG_KEY}; not an upcycled checkpoint "
                         "(load it with AutoModelForCausalLM.from_pretrained)")
    if spec.get("version") != SPEC_VERSION:
        raise ValueError(f"{path}: {CONFIG_KEY} version {spec.get('version')!r}, expected {SPEC_VERSION}")
    model_type = config_dict.get("model_type")
    base_type = spec.get("base_model_type") if model_type == UPCYCLED_MODEL_TYPE else model_type
    if base_type not in CONFIG_MAPPING:
        raise ValueError(f"{path}: the upcycled model's base architecture {base_type!r} is not known to "
                         "this transformers (not built in, and not registered with AutoConfig / "
                         "AutoModelForCausalLM in this process), so it cannot be rebuilt; register "
                         "it, then load with openmoe.moe.upcycle.load_upcycled")
    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "auto_map")}
    fields[CONFIG_KEY] = {**spec, "base_model_type": base_type}  # older specs lack it
    return CONFIG_MAPPING[base_type].from_dict(fields, **overrides), fields[CONFIG_KEY]


def load_upcycled(path: str | os.PathLike, *, config=None, **from_pretrained_kwargs) -> nn.Module:
    """Load a folder written by save_pretrained of an upcycled model (or a Hub repo of one).

    The dense architecture is built from config.json (AutoModelForCausalLM.from_config), the
    upcycle spec in config.openmoe_upcycle is applied without copying, and the safetensors weights
    (one file or sharded with an index) are loaded. Keyword arguments: dtype / torch_dtype
    (default: the saved dtype), device / device_map (a single device), attn_implementation,
    revision / token / cache_dir / local_files_only (Hub); the rest override config fields, as
    in from_pretrained. `config`: the folder's config already read (the remote code's
    UpcycledConfig, with from_pretrained's overrides applied). Returns the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    kw = dict(from_pretrained_kwargs)
    dtype, torch_dtype = kw.pop("dtype", None), kw.pop("torch_dtype", None)
    dtype = dtype if dtype is not None else torch_dtype
    device, device_map = kw.pop("device", None), kw.pop("device_map", None)
    device = device if device is not None else device_map
    if device is not None and not isinstance(device, (str, int, torch.device)):
        raise ValueError(f"device_map={device!r}: load_upcycled takes a single device")
    hub = {k: kw.pop(k) for k in _HUB_KWARGS if k in kw}
    model_kw = {k: kw.pop(k) for k in _MODEL_KWARGS if k in kw}
    for k in _IGNORED_KWARGS:
        kw.pop(k, None)
    folder = _local_folder(path, hub)

    if config is None:
        with open(os.path.join(folder, "config.json")) as f:
            config_dict = json.load(f)
    else:
        config_dict = config.to_dict()
    config, spec = _base_config(config_dict, path, kw)
    if dtype is not None and dtype != "auto":
        model_kw["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    model = AutoModelForCausalLM.from_config(config, **model_kw)
    _apply(model, spec, init=None)
    _load_weights(model, _weight_files(folder))
    if os.path.isfile(os.path.join(folder, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(folder)
    if device is not None:
        model.to(device)
    _mark_upcycled(model)
    return model.eval()


def model_from_config(config, **kwargs) -> nn.Module:
    """A randomly initialized upcycled model from a marked config (the remote code's from_config):
    the base model from its config, upcycled with the saved spec (router init std 0.02)."""
    from transformers import AutoModelForCausalLM

    base, spec = _base_config(config.to_dict(), "config", {})
    model = AutoModelForCausalLM.from_config(base, **kwargs)
    _apply(model, spec, (0.02, None))
    _mark_upcycled(model)
    return model
