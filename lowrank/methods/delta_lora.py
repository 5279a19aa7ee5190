"""Delta-LoRA: W also moves, by the delta of the low-rank product   (Delta-LoRA Eq. 6, Algorithm 1).

After every optimizer step t > K:  W ← W + λ·s·(B_{t+1}A_{t+1} − B_t A_t),  s = α/r, W gets no gradient.
The updates telescope: W_t = W_0 + λs(B_t A_t − B_K A_K). So instead of writing an out x in update every
step (which in bf16 would round most of it away), at step K we snapshot (A_K, B_K) and fold −λs·B_K A_K
into W once; from then on
    W_eff = (W_0 − λs B_K A_K) + (1+λ)·s·B A        (same value as the paper's in-place rule)
and the forward costs exactly what LoRA costs. The paper's W_t is a constant in backward, so A and B must
get LoRA's gradient s·(…), not (1+λ)s·(…): their gradients are scaled by 1/(1+λ) on the parameters
themselves (r x in and out x r, not tokens), which leaves the input gradient, which does see W_t, intact.
No dropout (Eq. 7: it breaks g_W = g_BA); the snapshot and the "started" flag are saved with the adapter.
"""
from __future__ import annotations

import torch

from ..layer import add_low_rank
from .lora import LoraLayer


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient multiplied by a constant."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class DeltaLoraLayer(LoraLayer):
    method = "deltalora"
    prefix = "lora_"

    def init_adapter(self) -> None:
        super().init_adapter()
        self.ratio = float(self.config.deltalora_ratio)
        self.register_buffer("deltalora_A_start", torch.zeros_like(self.lora_A))
        self.register_buffer("deltalora_B_start", torch.zeros_like(self.lora_B))
        self.register_buffer("deltalora_started", torch.zeros((), dtype=torch.bool, device=self.lora_A.device))
        self._folded = False
        self._ready = False

    def post_init(self) -> None:
        if self.config.deltalora_start_step == 0 and not self.deltalora_started:
            self._snapshot()
        if self.deltalora_started:
            self._fold(-1)
        self._ready = True

    # ----- the W update ---------------------------------------------------------------------------
    @torch.no_grad()
    def _snapshot(self) -> None:
        self.deltalora_A_start.copy_(self.lora_A)
        self.deltalora_B_start.copy_(self.lora_B)
        self.deltalora_started.fill_(True)

    @torch.no_grad()
    def _fold(self, sign: int) -> None:
        """W ← W + sign·λs·B_K A_K (rounded once, in float64)."""
        w = self.weight
        start = self.deltalora_B_start.double() @ self.deltalora_A_start.double()
        w.copy_((w.double() + sign * self.ratio * self.scale * start).to(w.dtype))
        self._folded = sign < 0

    def after_optimizer_step(self, step: int) -> None:
        if not self.deltalora_started and step >= self.config.deltalora_start_step:
            if self.merged:
                raise RuntimeError("deltalora: unmerge before training")
            self._snapshot()
            self._fold(-1)

    # ----- protocol ---------------------------------------------------------------------------------
    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        if not self.deltalora_started:
            return super().adapted(x)
        c = 1.0 + self.ratio
        A, B = _ScaleGrad.apply(self.lora_A, 1 / c), _ScaleGrad.apply(self.lora_B, 1 / c)
        return add_low_rank(self.base_linear(x), x.to(A.dtype) @ A.T, B, c * self.scale)

    def delta_factors(self):
        if not self.deltalora_started:
            return super().delta_factors()
        return [((1.0 + self.ratio) * self.scale * self.lora_B, self.lora_A),
                (-self.ratio * self.scale * self.deltalora_B_start, self.deltalora_A_start)]

    def merge_delta(self) -> torch.Tensor:
        u, v = self.delta_factors()[0]   # −λs B_K A_K already lives in W
        return u @ v

    def release(self) -> None:
        super().release()
        if self._folded:
            self._fold(+1)

    def load_adapter_state(self, state) -> None:
        folded = self._folded
        if folded:
            self._fold(+1)
        super().load_adapter_state(state)
        if self._ready and self.deltalora_started:   # (during __init__, post_init folds)
            self._fold(-1)
