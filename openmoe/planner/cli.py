"""The planner from a TrainConfig: `train.py --plan` (print the table, load nothing) and the check
a run makes before loading when `device_memory` is set."""

from __future__ import annotations

from .layout import Layout, candidate_layouts, default_world, format_size, parse_size
from .memory import MemoryPlan, Workload, plan_memory


class PlanDoesNotFit(ValueError):
    """The run's plan is larger than --device_memory; the message is the whole table."""

    full_message = True  # utils.cli prints it whole: the first line names the flag, the table follows


def resolve_device(cfg) -> str:
    import torch

    if cfg.device != "auto":
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_compute(cfg, device: str) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    from ..utils.hardware import default_dtype

    import torch

    return "bf16" if default_dtype(device) == torch.bfloat16 else "fp32"


def workload(cfg, device: str | None = None, compute: str | None = None) -> Workload:
    from ..weight_kinds import check_target_names, parse_targets

    device = device or resolve_device(cfg)
    targets = check_target_names(list(parse_targets(cfg.lora_targets))) if cfg.peft else ()
    return Workload(batch=cfg.batch_size, seq=cfg.seq_len, compute=compute or resolve_compute(cfg, device),
                    peft=cfg.peft, lora_rank=cfg.lora_rank, lora_targets=tuple(targets),
                    lora_dropout=cfg.lora_dropout, quantize=cfg.quantize, optimizer=cfg.optimizer,
                    checkpointing=cfg.activation_checkpointing, freeze=tuple(cfg.freeze or ()), device=device)


def suggest(mcfg, w: Workload, budget: float, max_world: int = 1024) -> tuple[Workload, MemoryPlan] | None:
    """The smallest layout (fewest ranks) that fits, trying the run as given and then with
    activation checkpointing; LoRA runs are not sharded (the trainer has no LoRA under
    FSDP2/EP experts yet), so for them only the checkpointing switch is tried."""
    import dataclasses

    tries = [w] + ([dataclasses.replace(w, checkpointing=True)] if not w.checkpointing else [])
    best = None
    for wk in tries:
        layouts = [Layout()] if wk.peft else candidate_layouts(mcfg.num_experts, max_world)
        for lay in layouts:
            p = plan_memory(mcfg, wk, lay)
            if p.fits(budget):
                if best is None or lay.world < best[1].layout.world:
                    best = (wk, p)
                break
    return best


def render(p: MemoryPlan, title: str, budget: float | None = None, suggestion=None) -> str:
    w = p.workload
    lines = [title,
             f"per rank: micro-batch {w.batch} x seq {w.seq}, {w.compute}, "
             f"activation checkpointing {'on' if w.checkpointing else 'off'}, {w.optimizer}, {p.layout}; "
             f"{p.params_total / 1e9:.3f}B parameters, {p.trainable / 1e6:.2f}M trained",
             "", "| item | per rank | note |", "|---|---:|---|"]
    lines += [f"| {label} | {format_size(b)} | {note} |" for label, b, note in p.rows]
    lines.append(f"| **peak** | **{format_size(p.peak)}** | at {p.peak_at} |")
    lines.append("")
    lines.append("The peak is not the sum of the rows: it is the largest total met walking the step "
                 "(activations are freed as the backward creates gradients).")
    if budget is not None:
        if p.fits(budget):
            lines.append(f"device memory {format_size(budget)}: fits ({format_size(budget - p.peak)} to spare)")
        else:
            lines.append(f"device memory {format_size(budget)}: does NOT fit (short by {format_size(p.peak - budget)})")
            lines.append(_suggestion_line(suggestion, w))
    return "\n".join(lines)


def _suggestion_line(suggestion, w: Workload) -> str:
    if suggestion is None:
        return "no layout up to 1024 ranks fits; shorten --seq_len or --batch_size" + \
            ("" if w.peft else ", or fine-tune with --peft lora")
    wk, p = suggestion
    lay = p.layout
    flags = []
    if lay.world > 1:
        flags.append(f"torchrun --nproc-per-node {lay.world}" if lay.world <= 8 else f"{lay.world} ranks")
    if lay.ep > 1:
        flags.append(f"--ep {lay.ep}")
    if lay.fsdp > 1:
        flags.append(f"--fsdp {lay.fsdp}")
    if wk.checkpointing and not w.checkpointing:
        flags.append("--activation_checkpointing true")
    return (f"smallest layout that fits: {lay}{', activation checkpointing' if wk.checkpointing else ''} "
            f"-> {format_size(p.peak)} per rank ({' '.join(flags) or 'as given'})")


def describe(cfg, mcfg) -> str:
    src = cfg.init_from or cfg.model
    what = "full fine-tuning"
    if cfg.peft:
        what = f"LoRA r={cfg.lora_rank} on {', '.join(workload(cfg, 'cpu', 'fp32').lora_targets)}"
        what += f", base {cfg.quantize}" if cfg.quantize else ""
    return f"Memory plan: {src} ({mcfg.num_hidden_layers} layers, H {mcfg.hidden_size}, E {mcfg.num_experts}), {what}"


def plan_text(cfg, mcfg, world: int | None = None) -> tuple[str, bool]:
    """(the table, whether it fits device_memory: True when none is given). mcfg: the run's model
    config, from the caller (training.config.model_config: the planner does not read TrainConfigs'
    model sources itself, so it imports nothing of the training layer)."""
    w = workload(cfg)
    lay = Layout(world or cfg.world or default_world(), cfg.ep, cfg.fsdp, cfg.fsdp_experts)
    p = plan_memory(mcfg, w, lay)
    budget = parse_size(cfg.device_memory) if cfg.device_memory else None
    sugg = suggest(mcfg, w, budget) if budget is not None and not p.fits(budget) else None
    return render(p, describe(cfg, mcfg), budget, sugg), budget is None or p.fits(budget)


def check_fits(cfg, mcfg, world: int) -> None:
    """Before loading: raise PlanDoesNotFit with the table when the plan exceeds device_memory."""
    if not cfg.device_memory:
        return
    text, ok = plan_text(cfg, mcfg, world)
    if not ok:
        raise PlanDoesNotFit(f"the memory plan does not fit --device_memory {cfg.device_memory}; stopped "
                             f"before loading.\n{text}")
