"""Dynamic-rank DoRA ("Dynamic Low-Rank Adaptation"): rank-1 components pruned to a global budget.

    W = W_0 + s·Σ_{i=1}^{r'} c_i b_i a_iᵀ                                  (DynDoRA Eq. 6), s = α/r'
    s_i = ‖c_i b_i a_iᵀ‖_F / ‖Σ_j c_j b_j a_jᵀ‖_F,  s̃_i ← β s̃_i + (1−β) s_i   (Eq. 7, 8)
    R = η·(1/n)·Σ_i (Var(a_i) + Var(b_i))   (DEM, Eq. 10; population variance, n = all components)

A, B Kaiming and c = 0 (the official code's init: identity at start). The budget b(t) is the average
number of live components per layer, from b_0 = r' to b_T = r. The seed's written schedule does not reach
b_T (seeds-extraction §12.25), so we use the AdaLoRA / official cubic form:
    b(t) = b_0                                              t < t_i
    b(t) = b_T + (b_0 − b_T)·(1 − (t − t_i)/(T − t_f − t_i))³  t_i ≤ t < T − t_f
    b(t) = b_T                                              t ≥ T − t_f
Every `dyndora_prune_interval` steps in the middle phase (and at every step of the final phase) the
round(b(t)·layers) components with the highest smoothed scores across *all* layers stay live; the rest are
pruned gently: c_i ← 0, a_i and b_i kept, so a component whose c_i regrows between prune steps can win its
place back (restoration). In the final phase the allocation is frozen. Scores and masks are persistent
buffers: they are saved with the adapter and restored with checkpoints.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..layer import AdapterLayer, add_low_rank


def budget(step: int, b0: float, bT: float, warmup: int, final: int, total: int) -> float:
    """Average live components per layer after `step` optimizer steps."""
    if step < warmup:
        return float(b0)
    if step >= total - final:
        return float(bT)
    progress = (step - warmup) / max(1, total - final - warmup)
    return bT + (b0 - bT) * (1 - progress) ** 3


class DynDoraLayer(AdapterLayer):
    method = "dyndora"
    prefix = "dyndora_"

    def check_rank(self, rank: int) -> None:
        super().check_rank(self.config.dyndora_initial_rank)

    def init_adapter(self) -> None:
        n, w = self.config.dyndora_initial_rank, self.weight
        kw = dict(device=w.device, dtype=torch.float32)
        self.dyndora_A = nn.Parameter(torch.empty(n, self.in_features, **kw))
        self.dyndora_B = nn.Parameter(torch.empty(self.out_features, n, **kw))
        self.dyndora_c = nn.Parameter(torch.zeros(n, **kw))
        nn.init.kaiming_uniform_(self.dyndora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.dyndora_B, a=math.sqrt(5))
        self.register_buffer("dyndora_score", torch.zeros(n, **kw))     # EMA of the importance s_i
        self.register_buffer("dyndora_mask", torch.ones(n, **kw))       # 1 live, 0 pruned
        self.scale = float(self.config.alpha) / n
        self.dropout = nn.Dropout(self.config.dropout) if self.config.dropout > 0 else nn.Identity()

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x).to(self.dyndora_A.dtype) @ self.dyndora_A.T
        return add_low_rank(self.base_linear(x), h, self.dyndora_B * self.dyndora_c, self.scale)

    def delta_factors(self):
        return [(self.scale * self.dyndora_B * self.dyndora_c, self.dyndora_A)]

    # ----- importance, DEM, pruning ---------------------------------------------------------------
    @torch.no_grad()
    def importance(self) -> torch.Tensor:
        """s_i (Eq. 7) from norms and r' x r' Grams: ‖c_i b_i a_iᵀ‖ = |c_i|‖b_i‖‖a_i‖."""
        A, B, c = self.dyndora_A.double(), self.dyndora_B.double(), self.dyndora_c.double()
        GA, GB = A @ A.T, B.T @ B
        total = (torch.outer(c, c) * GA * GB).sum().clamp_min(0).sqrt()
        parts = c.abs() * GA.diagonal().sqrt() * GB.diagonal().sqrt()
        return (parts / total.clamp_min(1e-30)).float()

    def dem(self) -> torch.Tensor:
        """Σ_i Var(a_i) + Var(b_i) over this layer's components (population variance)."""
        return self.dyndora_A.var(dim=1, unbiased=False).sum() + self.dyndora_B.var(dim=0, unbiased=False).sum()

    @classmethod
    def extra_loss_all(cls, layers: list["DynDoraLayer"]) -> torch.Tensor | None:
        eta = layers[0].config.dyndora_dem
        if eta == 0:
            return None
        n = sum(layer.dyndora_c.numel() for layer in layers)
        return eta * torch.stack([layer.dem() for layer in layers]).sum() / n

    @classmethod
    @torch.no_grad()
    def after_optimizer_step_all(cls, layers: list["DynDoraLayer"], step: int) -> None:
        cfg = layers[0].config
        for layer in layers:   # EMA every step (Eq. 8)
            layer.dyndora_score.mul_(cfg.dyndora_beta).add_((1 - cfg.dyndora_beta) * layer.importance())
        T, t_i, t_f = cfg.dyndora_total_steps, cfg.dyndora_warmup_steps, cfg.dyndora_final_steps
        if step > T - t_f:   # final phase: the allocation made at T − t_f (saved in the masks) stays
            for layer in layers:
                layer.dyndora_c.mul_(layer.dyndora_mask)
            return
        if step < t_i or (step < T - t_f and (step - t_i) % cfg.dyndora_prune_interval):
            return
        b = budget(step, cfg.dyndora_initial_rank, cfg.rank, t_i, t_f, T)
        scores = torch.cat([layer.dyndora_score for layer in layers])
        keep = min(scores.numel(), max(0, round(b * len(layers))))
        mask = torch.zeros_like(scores)
        if keep:
            mask[torch.topk(scores, keep).indices] = 1.0   # global: lowest smoothed scores pruned first
        for layer, m in zip(layers, mask.split([layer.dyndora_score.numel() for layer in layers])):
            layer.dyndora_mask.copy_(m)
            layer.dyndora_c.mul_(m)                        # gentle: a_i, b_i are kept


def live_ranks(model: nn.Module) -> dict[str, int]:
    """{module name: live components} for every dynamic-rank layer."""
    from ..inject import adapter_layers
    return {name: int(layer.dyndora_mask.sum().item())
            for name, layer in adapter_layers(model).items() if isinstance(layer, DynDoraLayer)}
