"""ETHER and ETHER+: multiplicative updates by (relaxed) Householder reflections (DeLoRA Eq. 2-3).

ETHER   W' = H W,          H  = I − 2ûûᵀ                       (a reflection: ‖H − I‖_F = 2, H orthogonal)
ETHER+  W' = H⁺ W H̃⁺,      H⁺ = I − ûûᵀ + v̂v̂ᵀ (‖H⁺ − I‖_F ≤ 2), H̃⁺ the same on the input side
        one-sided (etherplus_one_sided): W' = H⁺ W   (Table 1, "ETHER+ (one-side)")

W is stored (out, in), so H acts on the output dimension and H̃⁺ on the input dimension; every H is
block-diagonal with `ether_blocks` blocks, each with its own unit vectors. Nothing d x d is ever
built in forward: y = W' x is the base GEMM on H̃⁺x, followed by H on the output, and a reflection
of a vector is y − 2(y·û)û (two-sided ETHER+ on many tokens: W x plus a rank-4n path, see adapted()).
ETHER starts as a reflection (not the identity: that is the method); ETHER+ starts with v = u, so H⁺ = I.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..layer import AdapterLayer, add_low_rank
from ..options import Option


def unit(u: torch.Tensor) -> torch.Tensor:
    """Normalise the (…, blocks, block_dim) vectors along their last dim."""
    return u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def rank1_update(y: torch.Tensor, terms: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """y + Σ_k c_k·(y·û_k)û_k per block along y's last dim, with terms = (M, c) from stack_terms.

    As two skinny GEMMs, y + (y M)(M diag(c))ᵀ with M the block-embedded unit vectors (d x blocks·terms):
    one fused addmm instead of several passes over y."""
    M, c = terms
    M = M.to(y.dtype)
    return add_low_rank(y, y @ M, M * c.to(y.dtype))


def stack_terms(vectors: torch.Tensor, coef: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, c) for raw vectors (k·blocks, m) stacked term by term (u's blocks, then v's ...): all
    normalised at once, block-embedded side by side; coef (k·blocks,) holds each column's coefficient.
    With one block, vectors may carry a leading layer dim (L, k, m) -> M (L, m, k)."""
    uh = unit(vectors)
    if blocks == 1:
        return uh.mT, coef
    return torch.cat([embed(t) for t in uh.split(blocks)], dim=1), coef


def embed(uh: torch.Tensor) -> torch.Tensor:
    """(blocks, m) unit vectors -> (blocks*m, blocks) block-diagonal matrix Û with H = I − 2ÛÛᵀ."""
    if uh.shape[0] == 1:
        return uh.T
    return torch.block_diag(*uh.unsqueeze(-1))


class EtherLayer(AdapterLayer):
    method = "ether"
    prefix = "ether_"
    summary = "ETHER: W times a Householder reflection per block, bounded: ‖H − I‖_F = 2"
    default_learning_rate = 6e-3
    rescales_weight = True   # W_eff = H W: unmerge applies H to the merged weight's rounding error too
    options = (Option("ether_blocks", "int", 1, "Number n of diagonal blocks of the reflection H (each block has "
                                                "its own unit vector)."),)

    @classmethod
    def check_config(cls, config) -> None:   # ETHER+ shares it (ether_blocks)
        if config.ether_blocks <= 0:
            raise ConfigError(f"ether_blocks must be positive, got {config.ether_blocks}")

    def check_rank(self, rank: int) -> None:  # rank does not apply: ETHER is rank-1 per block
        n = self.config.ether_blocks
        dims = [self.out_features] + ([self.in_features] if self.two_sided else [])
        for d in dims:
            if d % n:
                raise ConfigError(f"ether_blocks={n} does not divide the layer dimension {d} "
                                  f"({self.out_features}x{self.in_features}); pick a divisor")

    two_sided = False

    def _vector(self, dim: int) -> nn.Parameter:
        n = self.config.ether_blocks
        u = torch.empty(n, dim // n, device=self.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        return nn.Parameter(u)

    def init_adapter(self) -> None:
        self.ether_u = self._vector(self.out_features)
        self._coefs(out=[-2.0])

    def _coefs(self, **sides: list[float]) -> None:
        """Per-column coefficients of each side's terms (constants: built once, not every forward)."""
        n = self.config.ether_blocks
        for side, coefs in sides.items():
            c = torch.tensor([x for x in coefs for _ in range(n)], device=self.weight.device)
            self.register_buffer(f"_coef_{side}", c, persistent=False)

    def out_terms(self):
        return stack_terms(self.ether_u, self._coef_out, self.config.ether_blocks)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        y = rank1_update(self.base_linear(x, bias=False), self.out_terms())
        return y if self.bias is None else y + self.bias

    def delta_factors(self):
        uh = unit(self.ether_u)
        U = embed(uh)                                   # (out, n)
        V = U.T @ self.weight.to(U.dtype)               # (n, in): ûᵀW per block
        return [(-2.0 * U, V)]                          # HW − W = −2ÛÛᵀW

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        # H is an orthogonal involution (H·H = I): W = H·(HW).
        M, c = self.out_terms()
        return rank1_update(merged.double().T, (M.double(), c.double())).T

    def reflection_distance(self) -> list[float]:
        """‖H − I‖_F per block (exactly 2 for ETHER)."""
        return [2.0] * self.config.ether_blocks


class EtherPlusLayer(EtherLayer):
    method = "etherplus"
    summary = "ETHER+: relaxed Householder reflections H⁺ W H̃⁺ on both sides of W, bounded: ‖H⁺ − I‖_F ≤ 2"
    default_learning_rate = 6e-3
    keeps_weight_on_merge = True  # H⁺ can be singular (v̂ ⟂ û): unmerge restores a saved copy
    options = EtherLayer.options + (
        Option("etherplus_one_sided", "bool", False, "ETHER+ on the output side only, H⁺W (ablation 'ETHER+ "
                                                     "one-side'); default is the two-sided H⁺ W H̃⁺."),)

    @property
    def two_sided(self) -> bool:
        return not self.config.etherplus_one_sided

    def init_adapter(self) -> None:
        self.ether_u = self._vector(self.out_features)
        self.ether_v = nn.Parameter(self.ether_u.detach().clone())       # v = u  ⇒  H⁺ = I
        if self.two_sided:
            self.ether_u_in = self._vector(self.in_features)
            self.ether_v_in = nn.Parameter(self.ether_u_in.detach().clone())
        self._coefs(out=[-1.0, 1.0], **({"in": [-1.0, 1.0]} if self.two_sided else {}))

    def out_terms(self):   # H⁺ = I − ûûᵀ + v̂v̂ᵀ
        return stack_terms(torch.cat([self.ether_u, self.ether_v]), self._coef_out, self.config.ether_blocks)

    def in_terms(self):
        return stack_terms(torch.cat([self.ether_u_in, self.ether_v_in]), self._coef_in, self.config.ether_blocks)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        # the normalised terms of both sides: prepared for the whole group when the model's forward did
        # (prepare_all), else computed here
        out, in_ = self.take_prepared() or (self.out_terms(), self.in_terms() if self.two_sided else None)
        if self.two_sided and x.numel() >= self.in_features * self.out_features:
            # Many tokens (≥ out): H⁺ W H̃⁺ = W + U V with U V of rank ≤ 4n (delta_factors), a LoRA-shaped
            # path whose factors cost O(out·in·n) per step but which writes and keeps no extra
            # tokens x in activation; with few tokens the weight-side work dominates (BENCHMARKS.md has
            # the measured costs of both paths).
            U, V = (torch.cat(t, dim=d) for t, d in zip(zip(*self._factors_of(out, in_)), (1, 0)))
            return add_low_rank(self.base_linear(x), x.to(V.dtype) @ V.T, U)
        if self.two_sided:
            x = rank1_update(x, in_)                                      # H̃⁺ x   (H̃⁺ is symmetric)
        y = rank1_update(self.base_linear(x, bias=False), out)           # H⁺ W H̃⁺ x
        return y if self.bias is None else y + self.bias

    def delta_factors(self):
        return self._factors_of(self.out_terms(), self.in_terms() if self.two_sided else None)

    def _factors_of(self, out, in_):
        # H⁺ W H̃⁺ − W = P W + H⁺ (W P̃),  P = M diag(c) Mᵀ = −ÛÛᵀ + V̂V̂ᵀ, P̃ likewise: rank ≤ 4 per block.
        W = self.weight.float()
        Mo, co = out
        factors = [(Mo * co, Mo.T @ W)]
        if in_ is not None:
            Mi, ci = in_
            HWM = rank1_update((W @ Mi).T, out).T                         # H⁺ applied to the columns of W M̃
            factors.append((HWM, ci.unsqueeze(1) * Mi.T))
        return factors

    @classmethod
    def prepare_all(cls, layers):
        """Both sides' normalised terms (M, c) of a group with one block per side (the default) in batched ops:
        one normalisation per side for all L layers instead of one per layer."""
        first = layers[0]
        if first.config.ether_blocks != 1:
            return
        outs = _stacked_side(layers, "ether_u", "ether_v", first._coef_out)[0].unbind()
        ins = (_stacked_side(layers, "ether_u_in", "ether_v_in", first._coef_in)[0].unbind() if first.two_sided
               else [None] * len(layers))
        for layer, mo, mi in zip(layers, outs, ins):
            layer.keep_prepared((mo, layer._coef_out), None if mi is None else (mi, layer._coef_in))

    @classmethod
    def stacked_delta_factors(cls, layers):
        """delta_factors of a group with one block per side (the default) in batched ops: two W products
        per layer, the normalisations and H⁺ over all L at once."""
        if layers[0].config.ether_blocks != 1:
            return super().stacked_delta_factors(layers)
        first = layers[0]
        Mo, co = _stacked_side(layers, "ether_u", "ether_v", first._coef_out)       # co = [−1, 1]
        factors = [(Mo * co, torch.stack([(Mo_l.T @ layer.weight.float()) for Mo_l, layer in zip(Mo, layers)]))]
        if first.two_sided:
            Mi, ci = _stacked_side(layers, "ether_u_in", "ether_v_in", first._coef_in)  # (L, in, 2)
            WM = torch.stack([layer.weight.float() @ Mi_l for Mi_l, layer in zip(Mi, layers)])  # (L, out, 2)
            HWM = WM + (Mo * co) @ (Mo.mT @ WM)                                    # H⁺ W M̃, all at once
            factors.append((HWM, ci.unsqueeze(1) * Mi.mT))
        return factors

    def reflection_distance(self) -> list[float]:
        """max over sides of ‖H⁺ − I‖_F per block = sqrt(2 − 2(û·v̂)²) ≤ √2 (the paper states the looser ≤ 2)."""
        sides = [(self.ether_u, self.ether_v)] + ([(self.ether_u_in, self.ether_v_in)] if self.two_sided else [])
        out = torch.zeros(self.config.ether_blocks)
        for u, v in sides:
            c = (unit(u) * unit(v)).sum(1).detach().cpu()
            out = torch.maximum(out, (2 - 2 * c * c).clamp_min(0).sqrt())
        return out.tolist()


def _stacked_side(layers, u_name: str, v_name: str, coef: torch.Tensor):
    """(M (L, d, 2) = [û v̂] of every layer of a one-block group, c): one side's terms in batched ops."""
    uv = torch.cat([torch.stack([getattr(layer, n) for layer in layers]) for n in (u_name, v_name)], dim=1)
    return stack_terms(uv, coef, 1)
