"""Router noise, training only.

  jitter              Switch Transformer: the router *input* times U(1 - eps, 1 + eps), eps 1e-2.
  gaussian            N(0, std^2) added to the router *logits*, std 1/E by default (ColossalAI's
                      docstring, "(0, 1/E^2)", read as a variance).
  colossalai_normal   ColossalAI's NormalNoiseGenerator as its code runs (their
                      router_noisy_policy="Gaussian"): N(0, std^2) added to the *logits* with
                      std 1/E^2 (`Normal(0, scale=1/E**2)`), i.e. E times smaller than gaussian's.
  colossalai_uniform  ColossalAI's UniformNoiseGenerator (router_noisy_policy="Jitter", from Mesh
                      TensorFlow): the *logits* times U(1 - eps, 1 + eps), eps 1e-2. Same law as
                      jitter, but on the logits, not on the router input.
The original OpenMoE (t5x) trains without router noise. All kinds act in training only (the
caller, MoELayer.router_logits, skips them in eval).

Seeded noise (`seed=` given) draws from a generator of its own, so a run's noise does not depend
on what else consumed the global RNG; unseeded noise uses torch's global RNG (which the trainer
checkpoints). Either way the same seed gives the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NOISE_KINDS = ("jitter", "gaussian", "colossalai_normal", "colossalai_uniform")


@dataclass
class RouterNoise:
    kind: str = "jitter"
    scale: float | None = None  # jitter, colossalai_uniform: eps (default 0.01); gaussian: std
    # (default 1/E); colossalai_normal: std (default 1/E^2)
    seed: int | None = None

    def __post_init__(self):
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"noise={self.kind!r}: choose one of {NOISE_KINDS} or None")
        if self.scale is not None and not self.scale >= 0:
            raise ValueError(f"noise scale must be >= 0, got {self.scale}")
        self._gen: torch.Generator | None = None

    @classmethod
    def make(cls, noise) -> "RouterNoise | None":
        """None | one of NOISE_KINDS | RouterNoise."""
        if noise is None or isinstance(noise, RouterNoise):
            return noise
        if isinstance(noise, str):
            return cls(noise)
        raise ValueError(f"noise={noise!r}: choose None, one of {NOISE_KINDS} or a RouterNoise")

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(self.seed)
        return self._gen

    def _draw(self, like: torch.Tensor, fn) -> torch.Tensor:
        out = torch.empty_like(like)
        return fn(out, self._generator(like.device))

    def on_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._times_uniform(x) if self.kind == "jitter" else x

    def on_logits(self, logits: torch.Tensor, num_experts: int) -> torch.Tensor:
        if self.kind == "gaussian":
            return self._add_normal(logits, 1.0 / num_experts)
        if self.kind == "colossalai_normal":
            return self._add_normal(logits, 1.0 / num_experts ** 2)
        if self.kind == "colossalai_uniform":
            return self._times_uniform(logits)
        return logits

    def _times_uniform(self, x: torch.Tensor) -> torch.Tensor:
        eps = 0.01 if self.scale is None else self.scale
        return x * self._draw(x, lambda t, g: t.uniform_(1.0 - eps, 1.0 + eps, generator=g))

    def _add_normal(self, logits: torch.Tensor, default_std: float) -> torch.Tensor:
        std = default_std if self.scale is None else self.scale
        return logits + self._draw(logits, lambda t, g: t.normal_(0.0, std, generator=g))
