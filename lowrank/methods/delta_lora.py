"""Delta-LoRA: W also moves, by the delta of the low-rank product   (Delta-LoRA Eq. 6, Algorithm 1).

After every optimizer step t > K:  W ← W + λ·s·(B_{t+1}A_{t+1} − B_t A_t),  s = α/r; W gets no gradient
and no optimizer state. The updates telescope, W_t = W_0 + λs(B_t A_t − B_K A_K), so we never write an
out x in update: at the end of optimizer step K (`after_optimizer_step(K)`) the layer snapshots
(A_K, B_K) into persistent buffers, and from then on the forward is the exact rank-2r path
    y = W_0 x + b + (1+λ)·s·B A x − λ·s·B_K A_K x,   [A; A_K] down, [(1+λ)sB, −λsB_K] up, one addmm.
The first W update therefore lands at step K+1 with B_K A_K as "previous" (K = 0: the snapshot is the init).
Counting: steps are optimizer steps counted from 1, A_t the value after t of them. This follows the paper's
text ("the W update starts after K training iterations") and W_T = W_0 + λs(B_T A_T − B_K A_K). Algorithm 1,
whose loop counts t = 0..T−1 and updates "if t > K", starts one step later (first update at the (K+2)-th
step, telescoping to B_{K+1}A_{K+1}); for that reading set deltalora_start_step to K+1.

Why not fold −λs·B_K A_K into W once (LoRA's forward cost)? The trainer keeps frozen weights in fp16/bf16
under mixed precision, and rounding W_0 − λs·B_K A_K perturbs every element by up to half an ulp of W:
for a snapshot of 1e-3..1e-2·‖W‖ that is 16-77 % of ‖λs·B_K A_K‖ in bf16 (2-20 % in fp16), and eject could
not give W_0 back bit for bit. The rank-2r path is exact in any dtype and leaves W_0 untouched, so merge,
unmerge, eject and the saved adapter are plain additive ones. Its price over LoRA is r·(in + out) more
multiply-adds per token (the snapshot half of the bottleneck), ~2r/d of the base d x d GEMM (BENCHMARKS.md
has the measured cost); before the snapshot the layer runs LoRA's code path unchanged.

Gradients: the paper's W_t is a constant in backward, so A and B must get LoRA's gradient s·(…), not
(1+λ)s·(…). _ScaleGrad multiplies their gradients by 1/(1+λ) on the parameters themselves (r x in and
out x r, not tokens), which leaves the input gradient, (W_t + sBA)ᵀg, as the paper's.
No dropout (Eq. 7: it breaks g_W = g_BA; check_config rejects it).
"""
from __future__ import annotations

import torch

from ..errors import AdapterError, ConfigError
from ..layer import add_low_rank
from ..options import Option
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
    summary = "Delta-LoRA: LoRA whose base weight W also moves by λ times each step's change of (α/r)·BA"
    default_learning_rate = 6e-4
    options = (
        Option("deltalora_ratio", "float", 2.0, "Delta-LoRA update ratio λ: W += λ·(α/r)·(B_{t+1}A_{t+1} − "
                                                "B_t A_t)."),
        Option("deltalora_start_step", "int", 500, "Delta-LoRA start step K: W moves after every optimizer step "
                                                   "t > K (t counted from 1: W_T = W_0 + λ·(α/r)·(B_T A_T − "
                                                   "B_K A_K)); Algorithm 1's 0-based loop corresponds to K + 1."),
    )

    @classmethod
    def check_config(cls, config) -> None:
        if config.deltalora_ratio < 0:
            raise ConfigError(f"deltalora_ratio (Delta-LoRA's λ) must be >= 0, got {config.deltalora_ratio}")
        if config.deltalora_start_step < 0:
            raise ConfigError(f"deltalora_start_step must be >= 0, got {config.deltalora_start_step}")
        if config.method == cls.method and config.dropout > 0:
            raise ConfigError("deltalora needs dropout = 0: its update W += λΔ(BA) relies on g_W = g_BA, "
                              "which dropout on the low-rank branch breaks (Delta-LoRA Eq. 7)")

    @classmethod
    def peft_config(cls, config, targets, conv):
        return None   # peft has no Delta-LoRA (its W moves too): exported as exact LoRA factors of rank 2r

    def init_adapter(self) -> None:
        super().init_adapter()
        self.ratio = float(self.config.deltalora_ratio)
        # (A_K, B_K) and whether they were taken: saved with the adapter, so a loaded adapter is the trained W_eff
        self.register_buffer("deltalora_A_start", torch.zeros_like(self.lora_A))
        self.register_buffer("deltalora_B_start", torch.zeros_like(self.lora_B))
        self.register_buffer("deltalora_started", torch.zeros((), dtype=torch.bool, device=self.lora_A.device))
        # host copy of deltalora_started: forward branches on it without a device sync; refreshed wherever
        # the buffer is loaded (load_adapter_state, load_state_dict)
        self._started = False

    def post_init(self) -> None:
        if self.config.deltalora_start_step == 0 and not self._started:
            self._snapshot()   # t > 0: the first update (step 1) uses the initial B_0 A_0

    @torch.no_grad()
    def _snapshot(self) -> None:
        if self.merged:   # the merged W holds the old ΔW; a new snapshot would make unmerge subtract another
            raise AdapterError("deltalora: the layer is merged; unmerge(model) before training")
        self.deltalora_A_start.copy_(self.lora_A)
        self.deltalora_B_start.copy_(self.lora_B)
        self.deltalora_started.fill_(True)
        self._started = True

    def after_optimizer_step(self, step: int) -> None:
        # normally step == K; a later step only if the run came in past K without a snapshot (K raised on resume)
        if step >= self.config.deltalora_start_step and not self._started:
            self._snapshot()

    def load_adapter_state(self, state) -> None:
        super().load_adapter_state(state)
        self._started = bool(self.deltalora_started)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._started = bool(self.deltalora_started)

    # ----- protocol ---------------------------------------------------------------------------------
    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        if not self._started:
            return super().adapted(x)   # steps ≤ K: plain LoRA
        c, s = 1.0 + self.ratio, self.scale
        A, B = _ScaleGrad.apply(self.lora_A, 1.0 / c), _ScaleGrad.apply(self.lora_B, 1.0 / c)
        down = torch.cat([A, self.deltalora_A_start])                                    # (2r, in)
        up = torch.cat([B * (c * s), self.deltalora_B_start * (-self.ratio * s)], dim=1)  # (out, 2r)
        return add_low_rank(self.base_linear(x), x.to(down.dtype) @ down.T, up)

    def distance_group(self) -> tuple:   # before and after the snapshot the factors differ in number
        return (*super().distance_group(), self._started)

    def delta_factors(self):
        """ΔW = W_t + sBA − W_0 = (1+λ)s·BA − λs·B_K A_K (W_0 is never modified)."""
        if not self._started:
            return super().delta_factors()
        return [((1.0 + self.ratio) * self.scale * self.lora_B, self.lora_A),
                (-self.ratio * self.scale * self.deltalora_B_start, self.deltalora_A_start)]
