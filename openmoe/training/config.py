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
    model: str | None = None  # model config folder/json (fresh weights), or use init_from
    model_overrides: dict = field(default_factory=dict)  # model config fields (--model_overrides.NAME)
    init_from: str | None = None  # an HF folder (converted/published/exported) to start from
    tokenizer: str | None = None  # HF tokenizer folder/name or sentencepiece .model
    # data
    data: list = field(default_factory=list)  # SourceConfig dicts
    seq_len: int = 2048  # tokens per packed row (<= max_position_embeddings)
    batch_size: int = 8  # per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0  # weights, data mixture sampling and noise
    # optimisation
    steps: int = 1000  # optimizer steps
    optimizer: str = "adamw"  # adamw | adafactor
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr / peak lr (cosine, linear)
    weight_decay: float = 0.1  # decoupled (AdamW); Adafactor's own rule
    betas: list = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 100  # linear warm-up from 0
    clip_grad: float = 1.0  # global grad-norm clip (0: off)
    freeze: list = field(default_factory=list)  # router, experts, embeddings, attention, mlp, norms, lm_head
    precision: str = "auto"  # auto | fp32 | bf16 (autocast)
    activation_checkpointing: bool = False  # recompute each decoder layer in backward
    # torch.compile each decoder layer (fullgraph; the MoE routing has no host syncs or graph
    # breaks). The first steps pay the compilation; numerics equal eager's to rounding.
    compile: bool = False  # torch.compile each decoder layer (fullgraph)
    device: str = "auto"  # auto | cpu | cuda
    cpu_retain_memory: bool = True  # on CPU keep freed memory mapped for reuse (utils.hardware.retain_freed_memory)
    ep: int = 1  # expert-parallel size under torchrun (world = dp x ep); batch_size is per rank
    # rank-to-mesh mapping (ColossalAI's use_ep_inside): true, EP groups of consecutive ranks
    # (inside a node), dp/ZeRO replicas across nodes; false, EP strided across nodes, dp/ZeRO inside
    ep_inside: bool = True  # EP groups = consecutive ranks (false: EP across nodes, dp/ZeRO inside the node)
    dist_timeout_s: float = 600.0  # a collective waiting longer than this (a dead peer) is an error
    balance_every: int = 0  # with ep > 1: re-place experts on EP ranks from measured load every N steps
    balance_search: str = "placement"  # placement: re-place all to minimise the max | swap: load + comm cost, node first
    balance_tolerance: float = 0.1  # balance_search=swap: imbalance (max/mean - 1) left alone, least gain to move
    ep_overlap_chunks: int = 1  # with ep > 1: N token chunks per MoE call, all_to_all overlapping expert GEMMs (1: off)
    ep_hierarchical: bool = False  # with ep > 1: all_to_all inside each node, then across nodes with one peer per node
    ep_ranks_per_node: int | None = None  # ranks per node for ep_hierarchical (default: torchrun's LOCAL_WORLD_SIZE)
    # checkpoints and logs
    out_dir: str = "out/train"  # checkpoints, metrics.jsonl, final/ (locked while a run uses it)
    save_every: int = 200  # steps between checkpoints
    keep_last: int = 2  # checkpoints kept
    log_every: int = 10  # steps between log lines / metrics rows
    peak_tflops: float | None = None  # for MFU; measured on this device when not given
    tensorboard: bool = False  # also write TensorBoard events (needs tensorboard; missing: an error at start)
    wandb: str | None = None  # Weights & Biases project to log to (needs wandb; missing: an error at start)
    # evaluation: held-out sources, each scored on its own (eval/<name>/loss, eval/<name>/ppl)
    eval_data: list = field(default_factory=list)  # SourceConfig dicts of held-out data (not trained on)
    eval_every: int = 0  # steps between evaluations (0: only with --eval_only); also at the last step
    eval_batches: int = 4  # batches of batch_size rows per eval source (the same rows every time)
    eval_only: bool = False  # evaluate init_from/model on eval_data, print and write metrics, no training
    export_final: bool = True  # write out_dir/final, an HF folder, at the end
    # parameter-efficient fine-tuning (openmoe/peft): frozen base, LoRA adapter through PEFT
    peft: str | None = None  # lora: train a LoRA adapter on a frozen base
    lora_rank: int = 8  # LoRA rank r
    lora_alpha: float = 16.0  # LoRA scale alpha (scaling alpha / r)
    lora_dropout: float = 0.0  # must be 0 with router/experts targets (PEFT target_parameters)
    lora_targets: list = field(default_factory=lambda: ["attention", "mlp", "extra_mlp", "experts"])  # or + router
    merge: bool = False  # also export out_dir/final: the adapter merged into the base
    quantize: str | None = None  # 4bit | 8bit: QLoRA through bitsandbytes (CUDA)
    # memory planner (openmoe/planner)
    plan: bool = False  # print the per-rank memory plan and exit, loading nothing
    device_memory: str | None = None  # e.g. 80GB / 24GiB: a run whose plan does not fit stops before loading
    world: int | None = None  # ranks to plan for (default: WORLD_SIZE, else 1)
    # FSDP2 shard group size, dividing the world size: 1 (off), the world size (non-expert params
    # sharded over all ranks) or in between (hybrid sharding, HSDP: sharded over groups of fsdp
    # consecutive ranks, replicated over the world / fsdp groups; experts replicated over dp)
    fsdp: int = 1  # FSDP2 shard group size: 1 off, world: FSDP, between: HSDP
    # with fsdp = world and dp > 1: also shard each EP rank's experts over its dp replicas with FSDP2
    # (hierarchical EP x FSDP; expert grads reduced over dp only). false: experts replicated over dp
    fsdp_experts: bool = True  # with fsdp = world and dp > 1: shard each EP rank's experts over dp

    def validate(self) -> "TrainConfig":
        def bad(key, msg):
            raise ConfigError(f"{key}={getattr(self, key)!r}: {msg}")

        check_types(self)
        if self.model is None and self.init_from is None:
            raise ConfigError("model: give a model config (model: configs/tiny) or init_from: an HF folder")
        for k in ("seq_len", "batch_size", "grad_accum", "steps", "save_every", "keep_last", "log_every",
                  "ep", "fsdp", "lora_rank"):
            if getattr(self, k) < 1:
                bad(k, "must be a positive integer")
        for k in ("warmup_steps", "balance_every", "seed", "eval_every"):
            if getattr(self, k) < 0:
                bad(k, "must be >= 0")
        if self.balance_search not in ("placement", "swap"):
            bad("balance_search", "choose placement or swap")
        if not self.balance_tolerance >= 0:
            bad("balance_tolerance", "must be >= 0")
        if self.ep_overlap_chunks < 1:
            bad("ep_overlap_chunks", "must be a positive integer (1: no overlap)")
        if self.ep_hierarchical and self.ep == 1:
            bad("ep_hierarchical", "needs ep > 1: there is no all_to_all to split")
        if self.ep_ranks_per_node is not None:
            if not self.ep_hierarchical:
                bad("ep_ranks_per_node", "is read only with ep_hierarchical: true")
            if not 1 < self.ep_ranks_per_node < self.ep or self.ep % self.ep_ranks_per_node:
                bad("ep_ranks_per_node", f"must divide ep={self.ep} and lie strictly between 1 and it "
                    f"(an EP group over several nodes)")
        if self.world is not None and self.world < 1:
            bad("world", "must be a positive integer")
        if self.optimizer not in ("adamw", "adafactor"):
            bad("optimizer", "choose adamw or adafactor")
        if self.schedule not in ("cosine", "linear", "constant"):
            bad("schedule", "choose cosine, linear or constant")
        if self.precision not in ("auto", "fp32", "bf16"):
            bad("precision", "choose auto, fp32 or bf16")
        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", "choose auto, cpu or cuda")
        finite = lambda v: v == v and abs(v) != float("inf")  # noqa: E731
        if not (self.lr > 0 and finite(self.lr)):
            bad("lr", "must be a finite number > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must be in [0, 1]")
        if not (self.weight_decay >= 0 and finite(self.weight_decay)):
            bad("weight_decay", "must be a finite number >= 0")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                           for b in self.betas):
            bad("betas", "must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        if not (self.clip_grad >= 0 and finite(self.clip_grad)):
            bad("clip_grad", "must be a finite number >= 0")
        if not (self.dist_timeout_s > 0 and finite(self.dist_timeout_s)):
            bad("dist_timeout_s", "must be a number of seconds > 0")
        if self.peak_tflops is not None and not (self.peak_tflops > 0 and finite(self.peak_tflops)):
            bad("peak_tflops", "must be a number > 0")
        if not (self.lora_alpha > 0 and finite(self.lora_alpha)):
            bad("lora_alpha", "must be a number > 0")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "must be in [0, 1)")
        if not self.out_dir.strip():
            bad("out_dir", "must name a folder")
        for k in ("freeze", "lora_targets"):
            if not all(isinstance(v, str) for v in getattr(self, k)):
                bad(k, "must be a list of names")
        if not all(isinstance(s, dict) for s in self.data):
            bad("data", "must be a list of source mappings ({name:, path:, ...})")
        if not self.data and not self.plan and not self.eval_only:  # a plan needs no data
            bad("data", "no data sources")
        if self.eval_batches < 1:
            bad("eval_batches", "must be a positive integer")
        if not all(isinstance(s, dict) for s in self.eval_data):
            bad("eval_data", "must be a list of source mappings ({name:, path:, ...})")
        if (self.eval_every or self.eval_only) and not self.eval_data:
            bad("eval_data", "no eval sources: give eval_data (held-out sources) for eval_every / --eval_only")
        names = [s.get("name") for s in self.eval_data]
        if len(set(names)) != len(names):
            bad("eval_data", "source names must be unique (they name the metrics eval/<name>/loss)")
        if self.wandb is not None and not self.wandb.strip():
            bad("wandb", "must name a project")
        check_model_overrides(self.model_overrides)
        from ..peft.checks import check_peft_fields
        from ..planner.layout import check_plan_fields

        try:
            check_peft_fields(self)
            check_plan_fields(self)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self


def key_help() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) of every TrainConfig field, read from the class itself: the
    type and default from the dataclass, the help from the field's trailing comment (a test
    checks every field has one), so `train.py --help` cannot drift from the config."""
    import inspect

    hints = typing.get_type_hints(TrainConfig)
    comments = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        name = line.strip().split(":", 1)[0]
        if name in hints and "  # " in line:
            comments[name] = line.split("  # ", 1)[1].strip()
    rows = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f.name, _type_name(hints[f.name]), json.dumps(default), comments.get(f.name, "")))
    return rows


def keys_text() -> str:
    """The keys block of `train.py --help`."""
    rows = key_help()
    w = max(len(k) + len(t) for k, t, _, _ in rows) + 6
    return "\n".join(f"  --{k} {t.upper()}".ljust(w) + f" {h} (default {d})" for k, t, d, h in rows)


def _type_name(typ) -> str:
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if typing.get_origin(typ) is typing.Union or type(typ).__name__ == "UnionType":
        return " or ".join(_type_name(a) for a in args) + " or null"
    return getattr(typ, "__name__", str(typ))


def _matches(val, typ) -> bool:
    origin = typing.get_origin(typ)
    if origin is typing.Union or type(typ).__name__ == "UnionType":
        return any(_matches(val, a) for a in typing.get_args(typ))
    if typ is type(None):
        return val is None
    if typ is bool:
        return isinstance(val, bool)
    if typ is int:
        return isinstance(val, int) and not isinstance(val, bool)
    if typ is float:
        return isinstance(val, (int, float)) and not isinstance(val, bool)
    return isinstance(val, origin or typ)


def check_types(cfg: "TrainConfig") -> None:
    """Every field against its annotation (ints are numbers too; bools are not ints)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        val = getattr(cfg, f.name)
        if not _matches(val, hints[f.name]):
            raise ConfigError(f"{f.name}={val!r}: expected {_type_name(hints[f.name])}, got {type(val).__name__}")
        if hints[f.name] is float and isinstance(val, int):
            setattr(cfg, f.name, float(val))


def model_config_fields() -> list[str]:
    """The OpenMoeConfig fields a --model_overrides.NAME may set."""
    from ..configuration_openmoe import OpenMoeConfig

    return [f.name for f in dataclasses.fields(OpenMoeConfig)]


def check_model_overrides(overrides: dict) -> None:
    """Unknown names are refused with the closest valid one (a typo would otherwise be dropped)."""
    import difflib

    if not isinstance(overrides, dict):
        raise ConfigError(f"model_overrides={overrides!r}: expected a mapping of OpenMoeConfig fields")
    known = model_config_fields()
    for k in overrides:
        if k not in known:
            close = difflib.get_close_matches(str(k), known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"--model_overrides.{k}: not an OpenMoeConfig field{hint}")


def model_config(cfg: "TrainConfig"):
    """The run's OpenMoeConfig: cfg.model (a folder or config.json) or init_from's config.json,
    with model_overrides applied BEFORE OpenMoeConfig's own validation, and seq_len checked
    against max_position_embeddings. Raises ConfigError naming the source or override."""
    from ..configuration_openmoe import OpenMoeConfig
    from ..utils.cli import read_json_object

    src = cfg.init_from or cfg.model
    key = "init_from" if cfg.init_from else "model"
    p = Path(src)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"{key} {src}: no such file or folder (or no config.json in it)")
    try:
        d = read_json_object(file)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key} {src}: {file} is not a valid config ({e})") from None
    check_model_overrides(cfg.model_overrides)
    d = {**d, **cfg.model_overrides}
    try:
        mcfg = OpenMoeConfig(**d)
    except (TypeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        via = f" (with model_overrides {cfg.model_overrides})" if cfg.model_overrides else ""
        raise ConfigError(f"{key} {src}: {msg}{via}") from None
    if cfg.seq_len > mcfg.max_position_embeddings:
        raise ConfigError(f"seq_len={cfg.seq_len}: exceeds the model's max_position_embeddings="
                          f"{mcfg.max_position_embeddings} ({file}); lower --seq_len or set "
                          f"--model_overrides.max_position_embeddings")
    return mcfg


def _coerce(key: str, raw: str, typ, where: str | None = None):
    origin = typing.get_origin(typ)
    union = origin is typing.Union or type(typ).__name__ == "UnionType"
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if typ in (int, float, str) or (union and args and args[0] in (int, float, str)):
        target = typ if typ in (int, float, str) else args[0]
        if raw.lower() in ("none", "null") and union:
            return None
        try:
            if target is int and any(c in raw.lower() for c in ".e"):
                f = float(raw)  # 1e3, 1000.0: an integer written as a float
                if f.is_integer():
                    return int(f)
                raise ValueError(raw)
            return target(raw)
        except ValueError:
            raise ConfigError(f"{where or '--' + key} {raw!r}: expected {_type_name(target)}") from None
    if typ is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where or '--' + key} {raw!r}: expected true/false")
    try:  # lists and dicts: YAML/JSON literal (or comma-separated for lists)
        val = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"{where or '--' + key} {raw!r}: not a YAML value") from None
    if origin in (list, None) and isinstance(val, str):
        val = [v for v in val.split(",") if v]
    return val


def load_config(path: str | None, overrides: list[str]) -> TrainConfig:
    """YAML file, then `--key value` pairs (also `--model_overrides.num_experts 8`). Every value
    is checked against its field's type (YAML numbers in any notation: `3e-3` is read by YAML 1.1
    as a string and converted here) and range."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config {path}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {path}: expected a mapping at the top level")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    unknown = set(raw) - set(fields)
    if unknown:
        import difflib

        k = sorted(map(str, unknown))[0]
        close = difflib.get_close_matches(k, list(fields), n=1)
        raise ConfigError(f"--config {path}: unknown key {k!r}" + (f"; did you mean {close[0]}?" if close else ""))
    for k, v in list(raw.items()):  # YAML strings for typed fields: '3e-3', 'null', 'true'
        if isinstance(v, str) and hints[k] is not str and _matches(v, hints[k]) is False:
            raw[k] = _coerce(k, v, hints[k], f"--config {path}: {k}")
    if len(overrides) % 2:
        raise ConfigError(f"overrides must be --key value pairs, got {overrides}")
    for flag, value in zip(overrides[::2], overrides[1::2]):
        if not flag.startswith("--"):
            raise ConfigError(f"expected a --key, got {flag!r}")
        key = flag[2:].replace("-", "_")
        if key.startswith("model_overrides."):
            sub = key.split(".", 1)[1]
            try:
                val = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"--{key} {value!r}: not a YAML value") from None
            if isinstance(val, str):
                try:
                    val = float(val)  # '1e-3'
                except ValueError:
                    pass
            raw.setdefault("model_overrides", {})[sub] = val
            continue
        if key not in fields:
            import difflib

            close = difflib.get_close_matches(key, list(fields), n=1)
            raise ConfigError(f"unknown flag --{flag[2:]}" + (f"; did you mean --{close[0]}?" if close else
                                                               f" (known: {', '.join(sorted(fields))})"))
        raw[key] = _coerce(key, value, hints[key])
    try:
        cfg = TrainConfig(**raw)
    except TypeError as e:
        raise ConfigError(f"--config {path}: {e}") from None
    return cfg.validate()


def dump_config(cfg: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, default=str)
