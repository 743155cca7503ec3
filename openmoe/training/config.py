"""TrainConfig: one YAML file plus `--key value` overrides, flowing one way into the trainer."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad training config or flag: the message names the file, key or flag."""


@dataclass
class TrainConfig:
    # model: a config folder/json (fresh weights) or init_from an HF folder (converted/published)
    model: str | None = None
    model_overrides: dict = field(default_factory=dict)
    init_from: str | None = None
    tokenizer: str | None = None  # HF tokenizer folder/name or sentencepiece .model
    # data
    data: list = field(default_factory=list)  # SourceConfig dicts
    seq_len: int = 2048
    batch_size: int = 8  # per micro-batch
    grad_accum: int = 1
    seed: int = 0
    # optimisation
    steps: int = 1000
    optimizer: str = "adamw"  # adamw | adafactor
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 100
    clip_grad: float = 1.0
    freeze: list = field(default_factory=list)  # router, experts, embeddings, attention, mlp, norms, lm_head
    precision: str = "auto"  # auto | fp32 | bf16 (autocast)
    activation_checkpointing: bool = False
    # torch.compile each decoder layer (fullgraph; the MoE routing has no host syncs or graph
    # breaks). The first steps pay the compilation; numerics equal eager's to rounding.
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    cpu_retain_memory: bool = True  # on CPU keep freed memory mapped for reuse (utils.hardware.retain_freed_memory)
    ep: int = 1  # expert-parallel size under torchrun (world = dp x ep); batch_size is per rank
    dist_timeout_s: float = 600.0  # a collective waiting longer than this (a dead peer) is an error
    balance_every: int = 0  # with ep > 1: re-place experts on EP ranks from measured load every N steps
    # checkpoints and logs
    out_dir: str = "out/train"
    save_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    peak_tflops: float | None = None  # for MFU; measured on this device when not given
    tensorboard: bool = True
    export_final: bool = True
    # parameter-efficient fine-tuning (openmoe/peft): frozen base, LoRA adapter through PEFT
    peft: str | None = None  # lora
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # must be 0 with router/experts targets (PEFT target_parameters)
    lora_targets: list = field(default_factory=lambda: ["attention", "mlp", "extra_mlp", "experts"])
    merge: bool = False  # also export out_dir/final: the adapter merged into the base
    quantize: str | None = None  # 4bit | 8bit: QLoRA through bitsandbytes (CUDA)
    # memory planner (openmoe/planner)
    plan: bool = False  # print the per-rank memory plan and exit, loading nothing
    device_memory: str | None = None  # e.g. 80GB / 24GiB: a run whose plan does not fit stops before loading
    world: int | None = None  # ranks to plan for (default: WORLD_SIZE, else 1)
    # FSDP2 shard group size, dividing the world size: 1 (off), the world size (non-expert params
    # sharded over all ranks) or in between (hybrid sharding, HSDP: sharded over groups of fsdp
    # consecutive ranks, replicated over the world / fsdp groups; experts replicated over dp)
    fsdp: int = 1
    # with fsdp = world and dp > 1: also shard each EP rank's experts over its dp replicas with FSDP2
    # (hierarchical EP x FSDP; expert grads reduced over dp only). false: experts replicated over dp
    fsdp_experts: bool = True

    def validate(self) -> "TrainConfig":
        def bad(key, msg):
            raise ConfigError(f"{key}={getattr(self, key)!r}: {msg}")

        if self.model is None and self.init_from is None:
            raise ConfigError("model: give a model config (model: configs/tiny) or init_from: an HF folder")
        for k in ("seq_len", "batch_size", "grad_accum", "steps", "save_every", "keep_last", "log_every"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                bad(k, "must be a positive integer")
        if self.optimizer not in ("adamw", "adafactor"):
            bad("optimizer", "choose adamw or adafactor")
        if self.schedule not in ("cosine", "linear", "constant"):
            bad("schedule", "choose cosine, linear or constant")
        if self.precision not in ("auto", "fp32", "bf16"):
            bad("precision", "choose auto, fp32 or bf16")
        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", "choose auto, cpu or cuda")
        if not isinstance(self.ep, int) or self.ep < 1:
            bad("ep", "must be a positive integer")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if self.warmup_steps < 0:
            bad("warmup_steps", "must be >= 0")
        if not self.data and not self.plan:  # a plan needs no data
            bad("data", "no data sources")
        from ..peft.checks import check_peft_fields
        from ..planner.layout import check_plan_fields

        try:
            check_peft_fields(self)
            check_plan_fields(self)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self


def _coerce(key: str, raw: str, typ):
    origin = typing.get_origin(typ)
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if typ in (int, float, str) or (origin is typing.Union and args and args[0] in (int, float, str)):
        target = typ if typ in (int, float, str) else args[0]
        if raw.lower() in ("none", "null") and origin is typing.Union:
            return None
        try:
            return target(raw)
        except ValueError:
            raise ConfigError(f"--{key} {raw!r}: expected {target.__name__}") from None
    if typ is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key} {raw!r}: expected true/false")
    try:  # lists and dicts: YAML/JSON literal (or comma-separated for lists)
        val = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--{key} {raw!r}: not a YAML value") from None
    if origin in (list, None) and isinstance(val, str):
        val = [v for v in val.split(",") if v]
    return val


def load_config(path: str | None, overrides: list[str]) -> TrainConfig:
    """YAML file, then `--key value` pairs (also `--model_overrides.num_experts 8`)."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {path}: expected a mapping at the top level")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {sorted(unknown)}")
    if len(overrides) % 2:
        raise ConfigError(f"overrides must be --key value pairs, got {overrides}")
    for flag, value in zip(overrides[::2], overrides[1::2]):
        if not flag.startswith("--"):
            raise ConfigError(f"expected a --key, got {flag!r}")
        key = flag[2:].replace("-", "_")
        if key.startswith("model_overrides."):
            sub = key.split(".", 1)[1]
            raw.setdefault("model_overrides", {})[sub] = yaml.safe_load(value)
            continue
        if key not in fields:
            raise ConfigError(f"unknown flag --{flag[2:]} (known: {', '.join(sorted(fields))})")
        raw[key] = _coerce(key, value, hints[key])
    try:
        cfg = TrainConfig(**raw)
    except TypeError as e:
        raise ConfigError(f"--config {path}: {e}") from None
    return cfg.validate()


def dump_config(cfg: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, default=str)
