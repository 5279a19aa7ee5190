"""DeLoRA: W_eff = W + (λ‖W̄‖/r)·B Ξ A,  Ξ_ii = 1/(‖b_i‖‖a_i‖)   (DeLoRA Eq. 5, 8, 15).

Each normalised rank-1 term b_i a_iᵀ/(‖b_i‖‖a_i‖) has Frobenius norm 1, so the update lives in a ball
whose radius is set by the learnable λ (one per matrix) and the frozen pretrained norm ‖W̄‖, not by
the learning rate. ‖W̄‖ (`delora_norm`):
  column     one norm per input column, ΔW = (λ/r) B Ξ A diag(‖W̄_:,j‖)  (peft, official code)
  frobenius  a scalar ‖W̄‖_F (the paper's text)
  none       1 (ablation "normalize w/ controllable boundary", Table 1 row 2)
Init (`delora_init`):
  subtract   A, B Kaiming and a frozen copy (λ0, A0, B0) of the initial update subtracted (Eq. 9), so
             W_eff = W̄ + ΔW(t) − ΔW(0) starts at W̄.
  zero_b     B = 0 (peft): ΔW(0) = 0 with Ξ's norms clamped at delora_eps.

The boundary. Each normalised term, scaled by N, has norm ≤ N where N = max_j ‖W̄_:,j‖ (column),
‖W̄‖_F (frobenius) or 1 (none), so for zero_b  ‖W_eff − W̄‖_F ≤ |λ|·N, and for subtract
‖W_eff − W̄‖_F ≤ (|λ| + |λ0|)·N. (Clamping a norm below delora_eps only shrinks a term.)
The forward never forms ΔW: x (A ⊙ w)ᵀ is scaled by Ξλ/r in the r-dim bottleneck, then Bᵀ. With the
subtract init the frozen copy rides in the same bottleneck ([A; A0] down, [BΞ, −B0Ξ0] up: 2r wide) rather
than being folded into W: folding would round W̄ − ΔW(0) in the base weight's dtype (fp16/bf16 under mixed
precision: up to half an ulp of W per element, a visible fraction of a small update) and W̄ could not be
given back bit for bit. Unfolded, W̄ is never touched and every path is exact in any dtype.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..layer import AdapterLayer, add_low_rank
from ..options import Option

CHOICES = {"delora_norm": ("column", "frobenius", "none"), "delora_init": ("subtract", "zero_b")}


class DeloraLayer(AdapterLayer):
    method = "delora"
    prefix = "delora_"
    summary = "DeLoRA: normalised rank-1 terms scaled by a learnable boundary λ and ‖W‖, a bounded update"
    default_learning_rate = 6e-3
    options = (
        Option("delora_lambda", "float", 15.0, "Initial value of DeLoRA's learnable boundary lambda (one per "
                                               "adapted matrix)."),
        Option("delora_norm", "str", "column", "Pretrained-norm scaling of ΔW: 'column' (one norm per input "
                                               "column, as peft and the official code), 'frobenius' (a scalar, "
                                               "as the paper text reads), 'none' (ablation)."),
        Option("delora_init", "str", "subtract", "'subtract': A, B Kaiming and the frozen initial update "
                                                 "subtracted (paper Eq. 9), carried as a second frozen rank-r "
                                                 "path; 'zero_b': B = 0 (peft's init)."),
        Option("delora_eps", "float", 1e-4, "Lower clamp of ||a_i|| and ||b_i|| in Ξ (avoids division by zero)."),
    )

    @classmethod
    def check_config(cls, config) -> None:
        for name, allowed in CHOICES.items():
            if getattr(config, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}")
        if config.delora_eps <= 0:
            raise ConfigError(f"delora_eps must be positive, got {config.delora_eps}")

    @classmethod
    def peft_config(cls, config, targets, conv):
        # peft's DeLoRA is Linear-only, with B = 0 at init and column norms; other options go out as LoRA factors
        if conv or config.delora_init != "zero_b" or config.delora_norm != "column":
            return None
        return {"peft_type": "DELORA", "r": config.rank, "delora_lambda": config.delora_lambda,
                "module_dropout": config.dropout, "target_modules": targets, "init_weights": True}

    def peft_state(self):
        return {t: getattr(self, t).detach() for t in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")}

    def init_adapter(self) -> None:
        cfg, r, w = self.config, self.config.rank, self.weight.detach()
        kw = dict(device=w.device, dtype=torch.float32)
        self.delora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.delora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        self.delora_lambda = nn.Parameter(torch.full((1,), float(cfg.delora_lambda), **kw))
        nn.init.kaiming_uniform_(self.delora_A, a=math.sqrt(5))
        if cfg.delora_init == "zero_b":
            nn.init.zeros_(self.delora_B)
        else:
            nn.init.kaiming_uniform_(self.delora_B, a=math.sqrt(5))
        if cfg.delora_norm == "column":
            w_norm = w.float().norm(dim=0)
        elif cfg.delora_norm == "frobenius":
            w_norm = w.float().norm().reshape(1)
        else:
            w_norm = torch.ones(1, **kw)
        self.register_buffer("delora_w_norm", w_norm)  # frozen ‖W̄‖: merge/unmerge stay exact
        if cfg.delora_init == "subtract":
            self.register_buffer("delora_A0", self.delora_A.detach().clone())
            self.register_buffer("delora_B0", self.delora_B.detach().clone())
            self.register_buffer("delora_lambda0", self.delora_lambda.detach().clone())
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self._cache_f0 = None

    def load_adapter_state(self, state) -> None:
        super().load_adapter_state(state)
        self._cache_f0 = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:   # torch's load_state_dict: the copy changes too
        super()._load_from_state_dict(*args, **kwargs)
        self._cache_f0 = None

    def _factors(self, A, B, lam, w=None):
        """(B·λΞ/r, A ⊙ ‖W̄‖) with Ξ_ii = 1/(‖b_i‖‖a_i‖), norms clamped at delora_eps (Eq. 8, 15). Shape-generic:
        A (…, r, in), B (…, out, r), λ (…, 1), w (…, in) or (…, 1), so a stacked group works the same."""
        w = self.delora_w_norm if w is None else w
        eps = self.config.delora_eps
        xi = lam / (self.config.rank * A.norm(dim=-1).clamp_min(eps) * B.norm(dim=-2).clamp_min(eps))   # (…, r)
        return B * xi.unsqueeze(-2), A * w.unsqueeze(-2)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        # ‖W̄‖ folded into A and λΞ/r into B: r x in and out x r scalings instead of passes over tokens,
        # and autograd saves what LoRA saves (x and the bottleneck h). The factors come from prepare_all
        # (one batched computation per group per forward) when the model's forward prepared them.
        up, down = self.take_prepared() or self._up_down()
        return add_low_rank(self.base_linear(x), self.dropout(x).to(down.dtype) @ down.T, up)

    def _up_down(self):
        """This layer's (up, down): the trainable factors, and with the subtract init the frozen copy beside them."""
        up, down = self._factors(self.delora_A, self.delora_B, self.delora_lambda)
        if self.config.delora_init == "subtract":
            u0, v0 = self._initial_factors()
            up, down = torch.cat([up, u0.to(up.dtype)], dim=1), torch.cat([down, v0.to(down.dtype)])
        return up, down

    @classmethod
    def prepare_all(cls, layers):
        """_up_down() of a whole group in batched ops: stacked parameters, one Ξ, one concatenation with the
        group's stacked frozen copy (kept while the frozen buffers are unchanged), then a view per layer."""
        up, down = cls._trained_stack(layers)
        frozen = cls._frozen_stacks(layers)[1]
        if frozen is not None:
            up, down = torch.cat([up, frozen[0]], dim=2), torch.cat([down, frozen[1]], dim=1)
        for layer, u, d in zip(layers, up.unbind(), down.unbind()):
            layer.keep_prepared(u, d)

    def delta_factors(self):
        factors = [self._factors(self.delora_A, self.delora_B, self.delora_lambda)]
        if self.config.delora_init == "subtract":
            factors.append(self._initial_factors())
        return factors

    @classmethod
    def stacked_delta_factors(cls, layers):
        """delta_factors of a group in batched ops: Ξ, the scalings and the frozen copy for all L at once."""
        frozen = cls._frozen_stacks(layers)[1]
        return [cls._trained_stack(layers)] + ([frozen] if frozen is not None else [])

    @classmethod
    def distance_all(cls, layers):
        """(L,) ‖ΔW(t) − ΔW(0)‖²_F, float64 as the base class. With U = [U₁ U₀] and V = [V₁; V₀] (U₀V₀ = −ΔW(0)):
            Σ(UᵀU ⊙ VVᵀ) = Σ(U₁ᵀU₁ ⊙ V₁V₁ᵀ) + 2 Σ(U₁ᵀU₀ ⊙ V₁V₀ᵀ) + Σ(U₀ᵀU₀ ⊙ V₀V₀ᵀ)
        and the frozen copy's factors and last term are constant, so they are kept (_frozen_terms): per
        step two r x r Gram blocks per side instead of one 2r x 2r, and no float64 copy of the frozen half."""
        if layers[0].config.delora_init != "subtract":
            return super().distance_all(layers)
        u1, v1 = (t.double() for t in cls._trained_stack(layers))
        u0, v0, c0 = cls._frozen_terms(layers)
        same = ((u1.mT @ u1) * (v1 @ v1.mT)).sum(dim=(1, 2))
        cross = ((u1.mT @ u0) * (v1 @ v0.mT)).sum(dim=(1, 2))
        return (same + 2 * cross + c0).clamp_min(0)

    @classmethod
    def _trained_stack(cls, layers):
        """(U₁ (L, out, r), V₁ (L, r, in)): the trained factors of a group, from its stacked parameters."""
        stack = lambda name: torch.stack([getattr(layer, name) for layer in layers])   # noqa: E731
        return layers[0]._factors(stack("delora_A"), stack("delora_B"), stack("delora_lambda"),
                                  cls._frozen_stacks(layers)[0])

    @staticmethod
    def _frozen_stacks(layers):
        """(stacked ‖W̄‖, stacked (U₀, V₀) or None without the subtract init) of a group."""
        def build():
            frozen = None
            if layers[0].config.delora_init == "subtract":
                pairs = [layer._initial_factors() for layer in layers]
                frozen = (torch.stack([u for u, _ in pairs]), torch.stack([v for _, v in pairs]))
            return torch.stack([layer.delora_w_norm for layer in layers]), frozen
        return _kept(layers, "_frozen_stacks_kept", build)

    @classmethod
    def _frozen_terms(cls, layers):
        """(U₀, V₀, Σ(U₀ᵀU₀ ⊙ V₀V₀ᵀ)) of a subtract-init group in float64, for the distance."""
        def build():
            u0, v0 = (t.double() for t in cls._frozen_stacks(layers)[1])
            return u0, v0, ((u0.mT @ u0) * (v0 @ v0.mT)).sum(dim=(1, 2))
        return _kept(layers, "_frozen_terms_kept", build)

    def _initial_factors(self):
        """−ΔW(0) as factors (−B0Ξ0λ0/r, A0 ⊙ w), from frozen tensors: computed once per device."""
        cached = self._cache_f0
        if cached is None or cached[0].device != self.delora_A0.device:
            u0, v0 = self._factors(self.delora_A0, self.delora_B0, self.delora_lambda0)
            cached = self._cache_f0 = (-u0.detach(), v0.detach())
        return cached

    def bound(self) -> float:
        """The radius the docstring proves: |λ|·N (zero_b) or (|λ| + |λ0|)·N (subtract)."""
        n = float(self.delora_w_norm.max())
        lam = abs(self.delora_lambda.item())
        if self.config.delora_init == "subtract":
            lam += abs(self.delora_lambda0.item())
        return lam * n


def _kept(layers, attr: str, build):
    """build(), kept on the group's first layer (as `attr`) while the group's frozen buffers hold: recomputed when
    any of them changes its storage (a move) or in-place version (a loaded adapter)."""
    key = tuple((id(layer), *((b.data_ptr(), b._version) for b in layer.buffers(recurse=False))) for layer in layers)
    kept = getattr(layers[0], attr, None)
    if kept is None or kept[0] != key:
        kept = (key, build())
        setattr(layers[0], attr, kept)
    return kept[1]
