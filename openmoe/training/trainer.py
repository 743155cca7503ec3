"""The training loop: parallelism-agnostic, single process here (the distributed issue wraps the
same model and loop from outside).

One step = grad_accum micro-batches. The LM loss is weighted by each micro-batch's share of
target tokens, so accumulation gives the same gradient as one big batch; aux/z losses are
averaged over micro-batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

import torch.distributed as dist

from ..data import IGNORE, PackedMixture, SourceConfig, TextTokenizer
from ..generation.chat import ensure_chat_template
from ..parallel import ParallelState, clip_grad_norm, init_distributed, parallelize, sync_gradients
from ..parallel.expert_parallel import set_ep_exchange
from ..parallel.grads import is_sharded
from ..planner.layout import Layout
from ..utils.cli import DirLock, atomic_write_text
from ..utils.hardware import default_dtype, measured_peak, retain_freed_memory
from ..utils.atomic import atomic_folder
from ..utils.manifest import verify_manifest
from . import checkpoint as ckpt
from .compile import compile_layers
from .config import ConfigError, TrainConfig, dump_config, model_config
from .evaluation import draw_eval_batches, evaluate
from .metrics import (MetricsSink, executed_flops, expert_params, expert_stats, flops_per_token,
                      missing_backends, routed_per_expert)
from .optim import build_optimizer, freeze, lr_lambda
from .preflight import preflight

# what train_step logs of the model's losses, in this order (the total first, then its parts)
LOSS_KEYS = ("loss", "lm_loss", "aux_loss", "router_z_loss", "output_z_loss")


class TrainingDiverged(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, log=print, ps: ParallelState | None = None,
                 verify: bool = True, trust_checkpoint: bool = False):
        """verify: check manifests (sha256) of the checkpoint resumed from and of init_from;
        trust_checkpoint: resume from a checkpoint that has no manifest (see checkpoint.check)."""
        self.cfg, self.resume = cfg, resume
        self.verify, self.trust_checkpoint = verify, trust_checkpoint
        try:
            self.ps = ps or init_distributed(cfg.ep, timeout_s=cfg.dist_timeout_s, ep_inside=cfg.ep_inside)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.log = log if self.ps.is_main else (lambda *a, **k: None)  # rank 0 speaks
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.lock = DirLock(self.out)  # rank 0 holds it from setup() to the end of train()
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device=cuda: no CUDA device here")
        if self.device == "cuda" and self.ps.distributed:
            self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(self.device)
        if cfg.precision == "auto":
            self.amp_dtype = default_dtype(self.device)
        else:
            self.amp_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        # the same big buffers every step: without this each step page-faults them in again
        self.retained_memory = self.device == "cpu" and cfg.cpu_retain_memory and retain_freed_memory()

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Everything before the first step, in order: the checks that need no weights, the
        tokenizer, the parallelised model, optimizer and data, the resumed state, the log lines."""
        self._check_start()
        torch.manual_seed(self.cfg.seed)
        self._load_tokenizer()
        self.model = self._parallel_model()
        self._optimizer_and_data()
        self.step = 0
        if self.resume:
            self._resume()
        self._measure_and_report()

    def _check_start(self) -> None:
        """What stops a run before anything is loaded: a second run on out_dir, a missing metrics
        backend, checkpoints without --resume, and the checks of training/preflight.py."""
        cfg = self.cfg
        if self.ps.is_main:
            self.lock.acquire()  # a second run on the same out_dir stops here, with a clear line
        why = missing_backends(cfg.tensorboard, cfg.wandb) if self.ps.is_main and not cfg.eval_only else None
        if why:  # asked for and missing: said at start, not after the model is loaded (or never)
            raise ConfigError(why)
        if not self.resume and not cfg.eval_only and ckpt.list_checkpoints(self.ckpt_dir):
            raise ConfigError(f"out_dir {cfg.out_dir} already has checkpoints: pass --resume to continue "
                              f"or choose another --out_dir")
        preflight(cfg, self.device, self.ps.world)  # QLoRA requirements, the memory plan: before loading

    def _load_tokenizer(self) -> None:
        tok_path = self.cfg.tokenizer or self.cfg.init_from
        if tok_path is None:
            raise ConfigError("tokenizer: give a tokenizer (HF folder/name or sentencepiece .model)")
        try:
            self.tokenizer = TextTokenizer(tok_path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        ensure_chat_template(self.tokenizer.hf)  # every exported folder can apply_chat_template

    def _parallel_model(self):
        """Built on meta, parallelised (EP / FSDP2 / HSDP), then each rank fills only its own
        shards; then the adapter, freezing, activation checkpointing and compilation."""
        cfg = self.cfg
        if cfg.fsdp > 1:
            from ..parallel.fsdp import check_shard_size

            try:  # 1 < fsdp < world: hybrid sharding (HSDP) over groups of fsdp consecutive ranks
                check_shard_size(cfg.fsdp, self.ps.world)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        model = self._build_model()
        on_meta = next(model.parameters()).is_meta
        model = parallelize(model if on_meta else model.to(self.device), self.ps,
                            fsdp=cfg.fsdp,
                            param_dtype=self.amp_dtype if self.amp_dtype != torch.float32 else None,
                            fsdp_experts=cfg.fsdp_experts)
        if on_meta:
            self._materialize(model)
        set_ep_exchange(model, cfg.ep_overlap_chunks, cfg.ep_hierarchical, cfg.ep_ranks_per_node)
        if cfg.peft:  # frozen base + LoRA adapter through PEFT (openmoe/peft)
            from ..peft.training import prepare_model

            model = prepare_model(model, cfg, self.amp_dtype)
        if cfg.freeze:
            freeze(model, cfg.freeze)
        if cfg.activation_checkpointing:
            model.activation_checkpointing_enable()
        if cfg.compile:
            n = compile_layers(model)
            self.log(f"compile: {n} decoder layers compiled with torch.compile(fullgraph=True); the first "
                     f"steps include compilation")
        model.train()
        return model

    def _materialize(self, model) -> None:
        """Each rank allocates and fills only its own shards (openmoe/parallel/materialize.py)."""
        from ..parallel.materialize import materialize_fresh, materialize_from

        cfg = self.cfg
        try:
            if cfg.init_from:
                materialize_from(model, cfg.init_from, self.device)
            else:
                materialize_fresh(model, self.device, cfg.seed)
        except ValueError as e:
            raise ConfigError(f"init_from {cfg.init_from}: {e}" if cfg.init_from else str(e)) from None

    def _optimizer_and_data(self) -> None:
        from ..parallel.balance import ExpertBalancer
        from ..parallel.balance_search import SwapSearch

        cfg = self.cfg
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        sources = [SourceConfig.from_dict(dict(s)) for s in cfg.data]
        mc = self.model.config
        # Every rank draws the same global batch and keeps its slice: the data position is one
        # state for all ranks, and a run's data do not depend on how it is parallelised.
        self.data = PackedMixture(sources, self.tokenizer.encode, cfg.seq_len, cfg.batch_size * self.ps.world,
                                  cfg.seed, bos_id=mc.bos_token_id, eos_id=mc.eos_token_id) if sources else None
        self.eval_sources = [SourceConfig.from_dict({**dict(s), "weight": 1.0}) for s in cfg.eval_data]
        self._eval_cache = None
        search = SwapSearch(tolerance=cfg.balance_tolerance) if cfg.balance_search == "swap" else None
        self.balancer = ExpertBalancer(self.model, self.optimizer, self.ps, cfg.balance_every, self.log, search)

    def _resume(self) -> None:
        last = ckpt.latest(self.ckpt_dir, self.ps)
        if last is None:
            self.log(f"--resume: no checkpoint in {self.ckpt_dir}, starting from step 0")
            return
        try:
            state = ckpt.load(last, self.model, self.optimizer, self.scheduler, self.ps,
                              verify=self.verify, trust=self.trust_checkpoint)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.step = state["step"]
        self.data.load_state(state["data"])
        if state.get("placement"):
            self.balancer.load_state(state["placement"])
        self.log(f"resumed from {last} at step {self.step}")

    def _measure_and_report(self) -> None:
        """FLOPs per token and the peak for MFU; the run's layout and size, logged; its config saved."""
        cfg = self.cfg
        self.flops_per_token = flops_per_token(self.model, cfg.seq_len)  # LoRA: 4x, not 6x, the frozen base
        # the expert part of flops_per_token: what a dropped assignment does not cost
        self.expert_flops_per_token = (4 if cfg.peft else 6) * expert_params(self.model)
        peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else measured_peak(self.amp_dtype, self.device) * 1e9
        self.peak_flops = peak
        local = [(p.to_local() if is_sharded(p) else p, p.requires_grad) for p in self.model.parameters()]
        n_params = sum(t.numel() for t, _ in local)  # FSDP2 shards count what this rank holds
        n_train = sum(t.numel() for t, trained in local if trained)
        self.log(f"parallel: world {self.ps.world} = dp {self.ps.dp} x ep {self.ps.ep}"
                 + ("" if self.ps.ep_inside else " (EP groups strided across nodes, dp groups consecutive ranks)"))
        self._log_sharding()
        self.log(f"model: {n_params / 1e6:.2f}M parameters on this rank ({n_train / 1e6:.2f}M trained), "
                 f"{self.flops_per_token / 1e6:.1f} MFLOP/token, device {self.device}, "
                 f"compute {str(self.amp_dtype).replace('torch.', '')}, peak {peak / 1e12:.3f} TFLOP/s "
                 f"({'given' if cfg.peak_tflops else 'best measured matmul'})"
                 + (", freed CPU memory kept for reuse" if self.retained_memory else ""))
        if self.ps.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "train_config.json", dump_config(cfg))

    def _log_sharding(self) -> None:
        cfg = self.cfg
        layout = Layout(self.ps.world, self.ps.ep, cfg.fsdp, cfg.fsdp_experts)
        if layout.hybrid:
            self.log(f"fsdp: hybrid sharding (HSDP): non-expert parameters sharded over groups of {cfg.fsdp} "
                     f"consecutive ranks, replicated over {self.ps.world // cfg.fsdp} groups (mesh replicate "
                     f"{self.ps.world // cfg.fsdp} x shard {cfg.fsdp}); experts split by ep {self.ps.ep}, "
                     f"replicated over dp {self.ps.dp}")
        elif cfg.fsdp > 1:
            self.log(f"fsdp: non-expert parameters sharded over all {self.ps.world} ranks; experts split by ep "
                     f"{self.ps.ep}, " + (f"sharded over dp {self.ps.dp} (FSDP2, gradients reduced over dp, "
                                          f"divided by world)" if layout.experts_fsdp_sharded
                                          else "replicated over dp"))

    def _build_model(self):
        from .. import OpenMoeForCausalLM

        cfg = self.cfg
        mcfg = model_config(cfg)  # overrides checked, then the config's validation; seq_len vs positions
        if cfg.init_from:
            if not Path(cfg.init_from).is_dir():
                raise ConfigError(f"init_from {cfg.init_from}: no such folder")
            if self.verify:
                verify_manifest(cfg.init_from, required=False)  # exported folders carry one
            if not cfg.peft:  # on meta: the trainer reads each rank's slices (materialize_from)
                with torch.device("meta"):
                    model = OpenMoeForCausalLM(mcfg)
                return self._check_vocab(model)
            # PEFT/QLoRA keep from_pretrained: the frozen base in the compute dtype, or 4/8-bit
            # (bitsandbytes quantizes while loading), replicated on every rank
            from ..peft.training import from_pretrained_kwargs

            kw = from_pretrained_kwargs(cfg, self.amp_dtype, self.device)
            try:
                model = OpenMoeForCausalLM.from_pretrained(cfg.init_from, config=mcfg, **kw)
            except (OSError, ValueError, RuntimeError) as e:
                raise ConfigError(f"init_from {cfg.init_from}: cannot load the weights: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        else:  # on meta; per-tensor init after parallelising (materialize_fresh)
            with torch.device("meta"):
                model = OpenMoeForCausalLM(mcfg)
        return self._check_vocab(model)

    def _check_vocab(self, model):
        if len(self.tokenizer) > model.config.vocab_size:
            raise ConfigError(f"tokenizer {self.tokenizer.path} has {len(self.tokenizer)} pieces but the model's "
                              f"vocab_size is {model.config.vocab_size}")
        return model

    # ------------------------------------------------------------------ loop
    def _micro_batches(self):
        bs, r = self.cfg.batch_size, self.ps.rank
        return [{k: v[r * bs:(r + 1) * bs].to(self.device) for k, v in self.data.next_batch().items()}
                for _ in range(self.cfg.grad_accum)]

    def _all_sum(self, values: list[float]) -> list[float]:
        if not self.ps.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def train_step(self) -> dict:
        cfg = self.cfg
        batches = self._micro_batches()
        n_targets = [int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches]
        # Weight each micro-batch by its share of the global batch's targets; sync_gradients
        # averages over ranks, hence the factor world.
        total_targets = max(1, int(self._all_sum([sum(n_targets)])[0])) / self.ps.world
        A = len(batches)
        tpe, dropped, sums, routed = None, None, None, None
        for b, n in zip(batches, n_targets):
            with torch.autocast(self.device, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
                out = self.model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"],
                                 use_cache=False, output_router_logits=True)
            share = n / total_targets
            loss = out.lm_loss * share + (out.loss - out.lm_loss) / A
            loss.backward()
            # summed on the device: one host sync per step (below), not one per micro-batch and loss
            parts = [loss.detach(), out.lm_loss.detach() * share] + [
                (getattr(out, k).detach() / A if getattr(out, k) is not None else loss.new_zeros(()))
                for k in LOSS_KEYS[2:]]
            sums = torch.stack(parts) if sums is None else sums + torch.stack(parts)
            if out.tokens_per_expert is not None:
                self.balancer.observe(out.tokens_per_expert)
                tpe = out.tokens_per_expert if tpe is None else tpe + out.tokens_per_expert
                if out.router_logits:  # before capacity: what the router asked of each expert
                    mc = self.model.config
                    r = routed_per_expert(out.router_logits, mc.num_experts_per_tok, mc.num_experts)
                    routed = r if routed is None else routed + r
                dropped = out.dropped_fraction / A if dropped is None else dropped + out.dropped_fraction / A
        agg = dict(zip(LOSS_KEYS, sums.tolist()))
        if not math.isfinite(agg["loss"]):  # checked before the update: the weights stay as they were
            raise TrainingDiverged(f"step {self.step}: loss is {agg['loss']} (not finite); stopped without "
                                   f"saving; {self._kept()}")
        sync_gradients(self.model, self.ps)
        gnorm = clip_grad_norm(self.model, cfg.clip_grad, self.ps)
        if not torch.isfinite(gnorm):
            raise TrainingDiverged(f"step {self.step}: gradient norm is {gnorm.item()}; stopped without saving; "
                                   f"{self._kept()}")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        means = self._all_sum([agg[k] for k in LOSS_KEYS])
        for k, v in zip(LOSS_KEYS, means):  # the global figures are the means over ranks
            agg[k] = v / self.ps.world
        agg["grad_norm"] = gnorm.item()
        agg["tokens"] = sum(b["input_ids"].numel() for b in batches) * self.ps.world
        if tpe is not None:
            if self.ps.distributed:
                dist.all_reduce(tpe)
                dist.all_reduce(dropped)
                dropped = dropped / self.ps.world
                if routed is not None:
                    dist.all_reduce(routed)
            agg.update(expert_stats(tpe, dropped, routed))
            agg["kept_fraction"] = (float(tpe.sum()) / max(1, float(routed.sum())) if routed is not None
                                    else 1.0 - float(dropped.float().mean()))
        return agg

    def _kept(self) -> str:
        """What is true of the checkpoints after a diverged step (none is saved after it)."""
        ckpts = ckpt.list_checkpoints(self.ckpt_dir)
        if not ckpts:
            return f"no checkpoint was saved yet in {self.ckpt_dir}"
        return f"the last good checkpoint {ckpts[-1]} is kept (--resume continues from it)"

    def close(self) -> None:
        self.lock.release()

    def train(self) -> Path | None:
        if self.ps.is_main:
            self.lock.acquire()
        try:
            return self._train()
        finally:
            self.lock.release()

    def _sink(self, start_step: int | None):
        """metrics.jsonl and the loggers asked for (rank 0 only; None elsewhere)."""
        if not self.ps.is_main:
            return None
        try:
            return MetricsSink(self.out, self.cfg.tensorboard, self.cfg.wandb, start_step=start_step,
                               config=dataclasses.asdict(self.cfg))
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _check_peak(self, rate: float) -> None:
        """A window faster than the measured peak means the peak read low (a busy or cold start):
        measure again and keep the higher figure. A given peak_tflops is left as it is."""
        if self.cfg.peak_tflops or rate <= self.peak_flops:
            return
        new = max(self.peak_flops, measured_peak(self.amp_dtype, self.device) * 1e9)
        self.log(f"step {self.step} | measured peak {self.peak_flops / 1e12:.3f} TFLOP/s was below the achieved "
                 f"{rate / 1e12:.3f}: measured again, peak now {new / 1e12:.3f} TFLOP/s")
        self.peak_flops = new

    # ------------------------------------------------------------------ evaluation
    def _eval_batches(self) -> dict[str, list[dict]]:
        if self._eval_cache is None:  # drawn once: every evaluation scores the same rows
            mc = self.model.config
            self._eval_cache = draw_eval_batches(self.eval_sources, self.tokenizer.encode, self.cfg,
                                                 self.cfg.batch_size * self.ps.world, mc.bos_token_id,
                                                 mc.eos_token_id)
        return self._eval_cache

    def evaluate(self) -> dict:
        """Per eval source: loss and perplexity over its fixed eval batches (training/evaluation.py)."""
        bs, r = self.cfg.batch_size, self.ps.rank
        return evaluate(self.model, self._eval_batches(), slice(r * bs, (r + 1) * bs), self.device,
                        self.amp_dtype, self._all_sum)

    def _log_eval(self, res: dict, sink) -> None:
        if sink is not None:
            sink.write({"step": self.step, **res})
        parts = [f"{n} loss {res[f'eval/{n}/loss']:.4f} ppl {res[f'eval/{n}/ppl']:.2f}"
                 for n in (s.name for s in self.eval_sources)]
        self.log(f"eval step {self.step} | " + " | ".join(parts))

    def eval_only(self) -> dict:
        """--eval_only: evaluate the loaded model (init_from / model, or the checkpoint resumed
        from), print the figures and append them to metrics.jsonl; no training, no export."""
        if self.ps.is_main:
            self.lock.acquire()
        sink = self._sink(None)
        try:
            res = self.evaluate()
            self._log_eval(res, sink)
            return res
        finally:
            if sink is not None:
                sink.close()
            self.lock.release()

    def _train(self) -> Path | None:
        cfg = self.cfg
        if self.data is None:
            raise ConfigError("data: no data sources to train on")
        # a resumed run rewrites metrics.jsonl from its checkpoint's step, a fresh run from 0
        sink = self._sink(self.step)
        # Test hooks: SIGKILL this process at a step (only rank OPENMOE_TEST_KILL_RANK if set).
        kill_at = int(os.environ.get("OPENMOE_TEST_KILL_AT_STEP", "-1"))
        if os.environ.get("OPENMOE_TEST_KILL_RANK", str(self.ps.rank)) != str(self.ps.rank):
            kill_at = -1
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=os.environ.get("OPENMOE_NO_TQDM") == "1" or not self.ps.is_main)
        t_last, tokens_since, flops_since = time.perf_counter(), 0, 0.0
        window: dict[str, float] = {}  # sums of the scalar metrics since the last log line
        try:
            while self.step < cfg.steps:
                if self.step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                lr = self.scheduler.get_last_lr()[0]
                m = self.train_step()
                self.step += 1
                report = self.balancer.maybe_rebalance(self.step)
                if report:
                    self.log(f"step {self.step} | expert placement: max/mean rank load "
                             f"{[round(r['max_over_mean_before'], 3) for r in report]} -> "
                             f"{[round(r['max_over_mean_after'], 3) for r in report]}")
                    if sink is not None:
                        sink.write({"step": self.step, "rank_load_before": [r["max_over_mean_before"] for r in report],
                                    "rank_load_after": [r["max_over_mean_after"] for r in report]})
                tokens_since += m["tokens"]
                flops_since += executed_flops(m["tokens"], self.flops_per_token, self.expert_flops_per_token,
                                              m.get("kept_fraction", 1.0))
                for k in ("loss", "lm_loss", "aux_loss", "router_z_loss", "output_z_loss", "grad_norm"):
                    window[k] = window.get(k, 0.0) + m[k]
                window["n"] = window.get("n", 0) + 1
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", lm=f"{m['lm_loss']:.3f}")
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or self.step == 1:
                    self._log_window(window, m, lr, tokens_since, flops_since, time.perf_counter() - t_last, sink)
                    window = {}
                    t_last, tokens_since, flops_since = time.perf_counter(), 0, 0.0
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    t_eval = time.perf_counter()
                    self._log_eval(self.evaluate(), sink)
                    t_last += time.perf_counter() - t_eval  # evaluation time is not training throughput
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    bad = ckpt.non_finite(self.model, self.optimizer, self.ps)
                    if bad is not None:  # a diverged update is never saved: the newest checkpoint stays good
                        raise TrainingDiverged(f"step {self.step}: {bad} is not finite after the update (lr "
                                               f"{lr:.2e} too high?); not saved; {self._kept()}")
                    ckpt.save(self.ckpt_dir, self.step, self.model, self.optimizer, self.scheduler,
                              {"data": self.data.state(), "placement": self.balancer.state()}, cfg.keep_last,
                              self.ps)
        finally:
            bar.close()
            if sink is not None:
                sink.close()
        return self.export() if cfg.export_final else None

    def _log_window(self, window: dict, m: dict, lr: float, tokens: int, flops: float, dt: float, sink) -> None:
        """One log line and metrics.jsonl record for the steps since the last one: losses are
        means over those steps (the logged step included), expert load is the logged step's."""
        tps = tokens / dt
        self._check_peak(flops / dt / self.ps.world)
        n = window.pop("n")
        rec = {"step": self.step, **{k: v / n for k, v in window.items()}, "lr": lr, "tokens_per_s": tps,
               "mfu": flops / dt / (self.peak_flops * self.ps.world)}
        for k in ("expert_load_max_over_mean", "kept_load_max_over_mean", "drop_rate",
                  "tokens_per_expert", "routed_per_expert"):
            if k in m:
                rec[k] = m[k]
        if sink is not None:
            sink.write(rec)
        self.log(f"step {self.step} | loss {rec['loss']:.4f} | lm {rec['lm_loss']:.4f} | "
                 f"aux {rec['aux_loss']:.4f} | z {rec['router_z_loss']:.4f} | lr {lr:.2e} | "
                 f"gnorm {rec['grad_norm']:.2f} | tok/s {tps:.0f} | MFU {100 * rec['mfu']:.1f}% | "
                 f"load max/mean routed {rec.get('expert_load_max_over_mean')} kept "
                 f"{rec.get('kept_load_max_over_mean')} | drop {rec.get('drop_rate')}")

    def export(self) -> Path:
        """The final HF folder (weights, config, modeling code, tokenizer), written atomically."""
        cfg = self.cfg
        if cfg.peft:  # the adapter (PEFT format), the base, and with --merge the merged folder
            from ..peft.training import export as export_peft

            return export_peft(self.model, self.tokenizer.hf, self.out, init_from=cfg.init_from, merge=cfg.merge,
                               quantize=cfg.quantize, model_overrides=cfg.model_overrides, ps=self.ps, log=self.log)
        final = self.out / "final"
        if self.ps.distributed and (self.ps.ep > 1 or cfg.fsdp > 1):
            from ..parallel.export import export_distributed

            export_distributed(self.model, self.tokenizer.hf, final, self.ps)
            self.log(f"exported HF folder: {final}")
            return final
        if not self.ps.is_main:
            dist.barrier()
            return final
        with atomic_folder(final) as tmp:  # the manifest last: verified by infer.py and --init_from
            self.model.save_pretrained(tmp)
            self.tokenizer.hf.save_pretrained(tmp)
        if self.ps.distributed:
            dist.barrier()
        self.log(f"exported HF folder: {final}")
        return final
