"""DeLoRA's ablation variants from the ETHER side (DeLoRA Tables 1-2, rows V7, V6, V5): W' = Ĥ W, Ĥ bounded.

  mult_bounded   V7  Ĥ = I − (λ/2)ûûᵀ + (λ/2)v̂v̂ᵀ                                      (Eq. 10)
  mult_highrank  V6  Ĥ = I − (λ/r)UΣUᵀ + (λ/r)VΘVᵀ,  U, V with r/2 columns,
                     Σ_ii = 1/‖u_i‖², Θ_ii = 1/‖v_i‖²                                     (Eq. 12-14)
  mult_relaxed   V5  Ĥ = I − (λ/r)(BΞA − DΦC),  Ξ_ii = 1/(‖b_i‖‖a_i‖), Φ_ii = 1/(‖d_i‖‖c_i‖),
                     B, A, D, C with r/2 components each                                  (§2.2, the relaxation)

λ is learnable, one per adapted matrix (named mult_lambda, so parameter_groups puts it in the λ group).

Choices where the paper leaves room:
- V7's halving. Table 1 prints λ(uuᵀ − vvᵀ)W, Eq. 10 writes λ/2 per term and states ‖H⁺ − I‖_F ≤ λ. We take
  Eq. 10: it is Eq. 14 at r = 2 (V7 is V6 with one pair, one formula for both), the stated bound then holds
  as written, and λ = 2 makes it exactly ETHER+ (one-sided), the row below it ("boundary equal to 2").
- V5's width. Relaxing UΣUᵀ replaces each û_i û_iᵀ by b_i a_iᵀ/(‖b_i‖‖a_i‖), so each side keeps V6's r/2
  components: the same rank-r Ĥ − I and the same bound |λ| (r components per side would double it).
- Signs. The tables print the update without the minus of Ĥ − I; swapping the roles of the two sides maps
  one into the other, so we follow the equations (ETHER+'s sign).
- Init. The second side starts as a copy of the first (v = u, D = B, C = A), so Ĥ = I at init for any λ,
  as ETHER+ starts (v = u). λ starts at mult_lambda (default 2, ETHER+'s boundary).

The bound. Each normalised rank-1 term has Frobenius norm 1, so ‖Ĥ − I‖_F ≤ (|λ|/r)·(r/2 + r/2) = |λ|
(Eq. 13-14), and ‖ΔW‖_F = ‖(Ĥ − I)W̄‖_F ≤ ‖Ĥ − I‖_F·‖W̄‖_2 ≤ |λ|·σ_max(W̄).

The forward never builds Ĥ: y = W̄x, then y + (y·downᵀ)·upᵀ with Ĥ − I = up @ down (out x r, r x out),
a LoRA-shaped path on the output side, as ETHER applies its reflection.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..layer import AdapterLayer, add_low_rank
from ..options import Option

EVEN_RANK = ("mult_highrank", "mult_relaxed")   # r/2 components per side


def _kaiming(*shape: int, device) -> nn.Parameter:
    t = torch.empty(*shape, device=device, dtype=torch.float32)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return nn.Parameter(t)


class MultiplicativeLayer(AdapterLayer):
    """Ĥ W with Ĥ − I = up @ down given by terms(); the shared forward, factors, merge and bound."""

    prefix = "mult_"
    default_learning_rate = 6e-3
    rescales_weight = True          # W_eff = Ĥ W
    keeps_weight_on_merge = True    # Ĥ can be singular: unmerge restores a saved copy
    options = (Option("mult_lambda", "float", 2.0, "Initial learnable boundary λ of the mult_* variants: W' = Ĥ W "
                                                   "with ‖Ĥ − I‖_F ≤ |λ| (2 = ETHER+'s boundary; mult_bounded at "
                                                   "λ = 2 starts as one-sided ETHER+)."),)

    @classmethod
    def check_config(cls, config) -> None:   # one check for the family
        if config.method in EVEN_RANK and config.rank % 2:
            raise ConfigError(f"{config.method} splits the rank into two sides of r/2 components: rank must be "
                              f"even, got {config.rank}")
        if config.mult_lambda == 0:
            raise ConfigError("mult_lambda must be nonzero: with λ = 0 and both sides equal at init, every "
                              "gradient is zero and nothing trains")

    def components(self) -> int:
        """Rank-1 components per side."""
        return self.config.rank // 2

    def check_rank(self, rank: int) -> None:   # Ĥ acts on the output side only
        if self.components() > self.out_features:
            raise ConfigError(f"{self.method} with rank {rank} needs rank/2 <= {self.out_features}, the output "
                              f"size of a {self.out_features}x{self.in_features} layer")

    def init_lambda(self) -> None:
        self.mult_lambda = nn.Parameter(torch.full((1,), float(self.config.mult_lambda), device=self.weight.device))
        self._sigma_max = None

    def divisor(self) -> float:
        """r in λ/r (2 for V7, Eq. 10)."""
        return float(self.config.rank)

    def terms(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(up, down) of the minus side, (up, down) of the plus side], λ/r folded into up: Ĥ − I = Σ up @ down."""
        raise NotImplementedError

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_linear(x, bias=False)
        (u1, d1), (u2, d2) = self.terms()
        up, down = torch.cat([u1, u2], dim=1), torch.cat([d1, d2])
        y = add_low_rank(y, y @ down.T.to(y.dtype), up)       # (I + up·down) W x
        return y if self.bias is None else y + self.bias

    def delta_factors(self):
        # ΔW = (Ĥ − I) W: two terms (one per side), so distances use float64 Grams: the sides start equal
        # and cancel
        W = self.weight
        return [(u, d @ W.to(d.dtype)) for u, d in self.terms()]

    def bound(self) -> float:
        """|λ|·σ_max(W̄) ≥ ‖W_eff − W̄‖_F (module docstring); σ_max taken once from the pretrained weight."""
        if self._sigma_max is None:
            w = self._saved_weight if self.merged else self.weight
            self._sigma_max = float(torch.linalg.matrix_norm(w.detach().double(), ord=2))
        return abs(self.mult_lambda.item()) * self._sigma_max


def _unit_terms(u: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(coef·Ûᵀ… as up (out, k), Ûᵀ as down (k, out)) for raw rows u (k, out): UΣUᵀ = Σ û_i û_iᵀ."""
    uh = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return uh.T * coef, uh


class HighRankLayer(MultiplicativeLayer):
    method = "mult_highrank"
    summary = ("DeLoRA ablation V6: W times I − (λ/r)(UΣUᵀ − VΘVᵀ), r/2 unit columns per side, learnable λ: "
               "‖Ĥ − I‖_F ≤ |λ|")

    def init_adapter(self) -> None:
        self.mult_u = _kaiming(self.components(), self.out_features, device=self.weight.device)
        self.mult_v = nn.Parameter(self.mult_u.detach().clone())    # V = U  ⇒  Ĥ = I
        self.init_lambda()

    def terms(self):
        c = self.mult_lambda / self.divisor()
        return [_unit_terms(self.mult_u, -c), _unit_terms(self.mult_v, c)]


class BoundedEtherPlusLayer(HighRankLayer):
    method = "mult_bounded"
    summary = ("DeLoRA ablation V7: one-sided ETHER+ with a learnable boundary, W times "
               "I − (λ/2)(ûûᵀ − v̂v̂ᵀ): ‖Ĥ − I‖_F ≤ |λ|")

    def components(self) -> int:   # rank does not apply: one pair (u, v), as ETHER+ one-sided
        return 1

    def divisor(self) -> float:    # Eq. 10's λ/2 per term
        return 2.0


class RelaxedLayer(MultiplicativeLayer):
    method = "mult_relaxed"
    summary = ("DeLoRA ablation V5: W times I − (λ/r)(BΞA − DΦC), normalised rank-1 terms, r/2 per side, "
               "learnable λ: ‖Ĥ − I‖_F ≤ |λ|")

    def init_adapter(self) -> None:
        h, out, dev = self.components(), self.out_features, self.weight.device
        self.mult_A = _kaiming(h, out, device=dev)
        self.mult_B = _kaiming(out, h, device=dev)
        self.mult_C = nn.Parameter(self.mult_A.detach().clone())   # D Φ C = B Ξ A  ⇒  Ĥ = I
        self.mult_D = nn.Parameter(self.mult_B.detach().clone())
        self.init_lambda()

    def terms(self):
        c = self.mult_lambda / self.divisor()

        def side(B, A, sign):   # (sign·(λ/r)·B Ξ, A),  Ξ_ii = 1/(‖b_i‖‖a_i‖)
            xi = 1.0 / (B.norm(dim=0) * A.norm(dim=1)).clamp_min(1e-12)
            return B * (sign * c * xi), A
        return [side(self.mult_B, self.mult_A, -1.0), side(self.mult_D, self.mult_C, 1.0)]
