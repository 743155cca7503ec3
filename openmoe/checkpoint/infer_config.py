"""The OpenMoeConfig of a T5X checkpoint: inferred from its tensor shapes, or checked against them.

Shapes give the vocabulary and hidden size (embedding), the layer count (`layers_{i}`), the
attention width (query kernel), the intermediate size (a `wi_1` kernel), the experts (router
kernel) and the MoE interval (which layers have a router). They do not give head_dim (a 3072
wide query is 24 x 128 or 48 x 64), nor non-shape facts such as the router group size or the
z-loss factor, so those come from the shipped config (configs/base, 8b, 34b) whose shapes match,
or from `head_dim` and the defaults otherwise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..configuration_openmoe import OpenMoeConfig
from .errors import CheckpointError
from .keymap import t5x_shape, to_t5x

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
KNOWN_CONFIGS = ("base", "8b", "34b")
# The fields that shapes determine (attention as widths: heads x head_dim).
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_experts",
                "moe_layer_interval", "attention_width", "kv_width")
_EMBED = "token_embedder/embedding"
_LAYER = re.compile(r"decoder/layers_(\d+)/")


def load_config(name_or_path: str) -> OpenMoeConfig:
    """`base`, `8b`, `34b` (configs/NAME/config.json), a config.json, or a folder holding one."""
    path = Path(name_or_path)
    if name_or_path in KNOWN_CONFIGS and not path.exists():
        path = CONFIGS_DIR / name_or_path
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--config {name_or_path}: cannot read {path} ({e})") from None
    try:
        return OpenMoeConfig(**data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"--config {name_or_path}: invalid OpenMoE config in {path} ({e})") from None


def expected_shapes(config: OpenMoeConfig) -> dict[str, tuple[int, ...]]:
    """T5X name -> shape for every parameter of OpenMoeForCausalLM(config), in model order.
    The model is built on the meta device: no memory, and its names are the truth."""
    from ..modeling_openmoe import OpenMoeForCausalLM

    with torch.device("meta"):
        model = OpenMoeForCausalLM(config)
    out = {}
    for hf_name, p in model.named_parameters():
        mapped = to_t5x(hf_name)
        if mapped is None:  # a model parameter the table does not know: a bug, not bad input
            raise RuntimeError(f"keymap has no rule for model parameter {hf_name}")
        t5x_name, op = mapped
        out[t5x_name] = t5x_shape(tuple(p.shape), op)
    return out


def shape_fields(shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, int]:
    """The SHAPE_FIELDS read off the checkpoint's shapes; raises naming a missing parameter."""

    def need(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise CheckpointError(f"missing parameter {name} in {where}")
        return shapes[name]

    vocab, hidden = need(_EMBED)
    layers = sorted({int(m.group(1)) for n in shapes if (m := _LAYER.match(n))})
    if layers != list(range(len(layers))):
        gap = min(set(range(max(layers) + 1)) - set(layers)) if layers else 0
        raise CheckpointError(f"missing parameter decoder/layers_{gap}/... in {where} (layers are not contiguous)")
    router = "decoder/layers_{}/mlp/router/router_weights/w/kernel"
    moe = [i for i in layers if router.format(i) in shapes]
    interval = moe[0] + 1 if moe else len(layers) + 1
    if moe != [i for i in layers if (i + 1) % interval == 0]:
        raise CheckpointError(f"MoE layers {moe} in {where} do not follow one interval "
                              f"(layer i is MoE when (i+1) % N == 0)")
    dense = [i for i in layers if i not in moe]
    wi_1 = (f"decoder/layers_{dense[0]}/mlp/wi_1/kernel" if dense
            else f"decoder/layers_{moe[0]}/extra_mlp/wi_1/kernel")
    return {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": need(wi_1)[-1],
        "num_hidden_layers": len(layers),
        "num_experts": need(router.format(moe[0]))[-1] if moe else None,
        "moe_layer_interval": interval,
        "attention_width": need("decoder/layers_0/self_attention/query/kernel")[-1],
        "kv_width": need("decoder/layers_0/self_attention/key/kernel")[-1],
    }


def config_fields(config: OpenMoeConfig) -> dict[str, int]:
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_experts": config.num_experts if config.moe_layer_interval <= config.num_hidden_layers else None,
        "moe_layer_interval": min(config.moe_layer_interval, config.num_hidden_layers + 1),
        "attention_width": config.num_attention_heads * config.head_dim,
        "kv_width": config.num_key_value_heads * config.head_dim,
    }


def infer_config(shapes: dict[str, tuple[int, ...]], where: str, head_dim: int | None = None
                 ) -> tuple[OpenMoeConfig, str]:
    """(config, how it was found). A shipped config whose shapes match wins (it also carries
    the non-shape facts); otherwise defaults plus the shapes, with head_dim given or 64."""
    fields = shape_fields(shapes, where)
    for name in KNOWN_CONFIGS:
        known = load_config(name)
        if config_fields(known) == fields and head_dim in (None, known.head_dim):
            return known, f"shapes match configs/{name}"
    head_dim = head_dim or 64
    width, kv_width = fields["attention_width"], fields["kv_width"]
    if width % head_dim or kv_width % head_dim:
        raise CheckpointError(f"attention width {width} (kv {kv_width}) in {where} is not a multiple of "
                              f"head_dim {head_dim}: pass --head-dim or --config")
    kw = {k: v for k, v in fields.items() if k in OpenMoeConfig.__annotations__ and v is not None}
    kw.update(head_dim=head_dim, num_attention_heads=width // head_dim,
              num_key_value_heads=kv_width // head_dim, architectures=["OpenMoeForCausalLM"])
    try:
        config = OpenMoeConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{where}: the inferred config is invalid ({e})") from None
    return config, f"inferred from shapes (head_dim {head_dim})"


def config_problems(config: OpenMoeConfig, shapes: dict[str, tuple[int, ...]], files: dict[str, Path],
                    where: str) -> list[str]:
    """Every way the checkpoint differs from the config: differing config fields first, then
    missing, unexpected and mis-shaped parameters (each named with its file)."""
    problems = []
    try:
        found = shape_fields(shapes, where)
        problems += [f"{k}: config {v}, checkpoint {found[k]}" for k, v in config_fields(config).items()
                     if found[k] != v]
    except CheckpointError:
        pass  # the parameter list below names what is missing
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in shapes:
            problems.append(f"missing parameter {name} in {where}")
        elif tuple(shapes[name]) != shape:
            problems.append(f"{name}: shape {list(shapes[name])} in {files[name]} does not match "
                            f"{list(shape)} expected by the config")
    problems += [f"unexpected parameter {n} in {files[n]}" for n in shapes if n not in expected]
    return problems


def format_problems(problems: list[str], limit: int = 12) -> str:
    """One line: all field differences, parameters up to `limit`, then a count."""
    if len(problems) == 1:
        return problems[0]
    shown = problems[:limit]
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} mismatches: " + "; ".join(shown) + more
