"""Dynamic-rank DoRA ("Dynamic Low-Rank Adaptation"): rank-1 components pruned to a global budget.

    W = W_0 + s·Σ_{i=1}^{r'} c_i b_i a_iᵀ,  s = α/r'                       (DynDoRA Eq. 6)
    s_i = ‖c_i b_i a_iᵀ‖_F / ‖Σ_j c_j b_j a_jᵀ‖_F                          (Eq. 7)
    s̃_i ← β·s̃_i + (1−β)·s_i, every optimizer step                         (Eq. 8)
    R = η·(1/n)·Σ_i (Var(a_i) + Var(b_i))                                   (DEM, Eq. 10)

Init as the official code: A, B Kaiming, c = 0 (identity at start), r' = ceil(1.5·r) by default.

DEM: n counts the components of *all* adapted layers and Var is torch.var's default (unbiased, ÷(d−1)),
as in the official code; extra_loss_all returns this one model-wide mean (not a sum of per-layer means).
The official code divides the same sum by 2n, so its η = 0.1 is η = 0.05 here. It also switches DEM off
once the allocation is fixed; we keep it on throughout (the seed adds it to the loss unconditionally, and
extra_loss has no step to switch on).

Budget b(t) = average live components per layer, from b_0 = r' to b_T = r. The paper's written schedule
does not reach b_T (its formula has typos), so we use AdaLoRA's cubic form
    b(t) = b_0                                                 t < t_i
    b(t) = b_T + (b_0 − b_T)·(1 − (t − t_i)/(T − t_f − t_i))³    t_i ≤ t < T − t_f
    b(t) = b_T                                                 t ≥ T − t_f
(NB: the official DynDoRA code prunes the fraction ((r'−r)/r')·p³, i.e. b = b_0 − (b_0 − b_T)·p³ — the
seed's formula with its typos fixed — which prunes late rather than early; both reach b_T at T − t_f.)
t_i, t_f default to 15 % and 50 % of T, the official code's ratios.

At t_i and every `dyndora_prune_interval` steps after it (and at T − t_f) the round(b(t)·layers)
components with the highest smoothed scores across *all* layers stay live; the rest are pruned gently:
c_i ← 0, a_i and b_i kept. Between prune steps a pruned c_i may regrow and, if its score climbs back into
the budget, it survives the next prune step (restoration). The allocation made at T − t_f is final: after
it, pruned c_i are re-zeroed after every step. Scores and masks are persistent buffers, so they are saved
with the adapter and checkpoints restore the prune state.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..layer import AdapterLayer, adapter_layers, add_low_rank
from ..options import Option


def phases(cfg) -> tuple[int, int, int]:
    """(t_i, t_f, T) with the defaults resolved: t_i = 15 %, t_f = 50 % of T (official ratios)."""
    T = cfg.dyndora_total_steps
    t_i = round(0.15 * T) if cfg.dyndora_warmup_steps is None else cfg.dyndora_warmup_steps
    t_f = round(0.5 * T) if cfg.dyndora_final_steps is None else cfg.dyndora_final_steps
    return t_i, t_f, T


def budget(step: int, b0: float, bT: float, warmup: int, final: int, total: int) -> float:
    """b(t): average live components per layer after `step` optimizer steps (the cubic above)."""
    if step < warmup:
        return float(b0)
    if step >= total - final:
        return float(bT)
    progress = (step - warmup) / (total - final - warmup)
    return bT + (b0 - bT) * (1 - progress) ** 3


class DynDoraLayer(AdapterLayer):
    method = "dyndora"
    prefix = "dyndora_"
    summary = "Dynamic-rank DoRA: gated rank-1 components W + s·Σ c_i b_i a_iᵀ pruned to a global budget"
    default_learning_rate = 6e-4
    options = (
        Option("dyndora_initial_rank", "int | None", None, "Components r' per layer at the start; None means "
                                                           "ceil(1.5·rank)."),
        Option("dyndora_beta", "float", 0.9, "EMA factor β of the importance scores (official code: 0.9)."),
        Option("dyndora_dem", "float", 0.1, "Coefficient η of the DEM regulariser η·(1/n)·Σ(Var(a_i) + Var(b_i)), "
                                            "n = all components of the model (0 disables it)."),
        Option("dyndora_warmup_steps", "int | None", None, "Steps t_i before pruning starts; None means 15 "
                                                           "percent of dyndora_total_steps (the official code's "
                                                           "ratio)."),
        Option("dyndora_final_steps", "int | None", None, "Final steps t_f during which the component allocation "
                                                          "is frozen; None means 50 percent of dyndora_total_steps "
                                                          "(the official code's ratio)."),
        Option("dyndora_total_steps", "int", 1000, "Total training steps T (the budget schedule spans them)."),
        Option("dyndora_prune_interval", "int", 10, "Prune to the cubic budget every this many steps between t_i "
                                                    "and T − t_f."),
    )

    @classmethod
    def check_config(cls, config) -> None:
        for name in ("dyndora_total_steps", "dyndora_prune_interval"):
            if getattr(config, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(config, name)}")
        if not 0.0 <= config.dyndora_beta <= 1.0 or config.dyndora_dem < 0:
            raise ConfigError(f"dyndora needs 0 <= dyndora_beta <= 1 and dyndora_dem >= 0, "
                              f"got {config.dyndora_beta}, {config.dyndora_dem}")
        if config.dyndora_initial_rank is None:
            config.dyndora_initial_rank = math.ceil(1.5 * config.rank)
        if config.dyndora_initial_rank < config.rank:
            raise ConfigError(f"dyndora_initial_rank ({config.dyndora_initial_rank}) must be >= rank ({config.rank})")
        t_i, t_f, T = phases(config)
        # only a dyndora run uses the schedule (other methods may carry any values, e.g. unset warm-up ratios)
        if config.method == cls.method and (t_i < 0 or t_f < 0 or t_i + t_f > T):
            raise ConfigError(f"dyndora needs 0 <= dyndora_warmup_steps + dyndora_final_steps <= dyndora_total_steps, "
                              f"got t_i={t_i}, t_f={t_f}, T={T}")

    def check_rank(self, rank: int) -> None:
        super().check_rank(self.config.dyndora_initial_rank)

    def init_adapter(self) -> None:
        cfg = self.config
        n, w = cfg.dyndora_initial_rank, self.weight
        kw = dict(device=w.device, dtype=torch.float32)
        self.dyndora_A = nn.Parameter(torch.empty(n, self.in_features, **kw))   # rows a_iᵀ
        self.dyndora_B = nn.Parameter(torch.empty(self.out_features, n, **kw))  # columns b_i
        self.dyndora_c = nn.Parameter(torch.zeros(n, **kw))
        nn.init.kaiming_uniform_(self.dyndora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.dyndora_B, a=math.sqrt(5))
        self.register_buffer("dyndora_score", torch.zeros(n, **kw))     # s̃_i, the EMA of Eq. 8
        self.register_buffer("dyndora_mask", torch.ones(n, **kw))       # 1 live, 0 pruned
        self.scale = float(cfg.alpha) / n
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        # c folded into B (out x r'), not into the tokens x r' bottleneck
        h = self.dropout(x).to(self.dyndora_A.dtype) @ self.dyndora_A.T
        return add_low_rank(self.base_linear(x), h, self.dyndora_B * self.dyndora_c, self.scale)

    def delta_factors(self):
        return [(self.scale * self.dyndora_B * self.dyndora_c, self.dyndora_A)]

    @torch.no_grad()
    def constrain_average(self) -> None:
        # the run's allocation (the masks, copied into the average) holds for the average too: its pruned c_i,
        # which the average only decays towards 0, are 0, so its live rank is live_ranks'
        self.dyndora_c.mul_(self.dyndora_mask)

    # ----- importance, DEM, pruning ---------------------------------------------------------------
    @torch.no_grad()
    def importance(self) -> torch.Tensor:
        """s_i (Eq. 7) from norms and r' x r' Grams, no out x in matrix: ‖c_i b_i a_iᵀ‖ = |c_i|‖b_i‖‖a_i‖,
        ‖Σ_j c_j b_j a_jᵀ‖² = Σ_jk c_j c_k (a_j·a_k)(b_j·b_k), in float64 (a sum of signed terms)."""
        A, B, c = self.dyndora_A.double(), self.dyndora_B.double(), self.dyndora_c.double()
        GA, GB = A @ A.T, B.T @ B
        total = (torch.outer(c, c) * GA * GB).sum().clamp_min(0).sqrt()
        parts = c.abs() * GA.diagonal().sqrt() * GB.diagonal().sqrt()
        return (parts / total.clamp_min(1e-30)).float()   # all c = 0: every s_i = 0

    def dem(self) -> torch.Tensor:
        """Σ_i Var(a_i) + Var(b_i) over this layer's components (unbiased variance of each vector)."""
        return self.dyndora_A.var(dim=1).sum() + self.dyndora_B.var(dim=0).sum()

    @classmethod
    def extra_loss_all(cls, layers: list["DynDoraLayer"]) -> torch.Tensor | None:
        eta = layers[0].config.dyndora_dem
        if eta == 0:
            return None
        n = sum(layer.dyndora_c.numel() for layer in layers)   # components of the whole model
        return eta * torch.stack([layer.dem() for layer in layers]).sum() / n

    @classmethod
    @torch.no_grad()
    def after_optimizer_step_all(cls, layers: list["DynDoraLayer"], step: int) -> None:
        cfg = layers[0].config
        for layer in layers:   # Eq. 8, every step (also during warm-up, so scores are ripe at t_i)
            layer.dyndora_score.mul_(cfg.dyndora_beta).add_((1 - cfg.dyndora_beta) * layer.importance())
        t_i, t_f, T = phases(cfg)
        if step > T - t_f:     # final phase: the allocation made at T − t_f (in the masks) stays
            for layer in layers:
                layer.dyndora_c.mul_(layer.dyndora_mask)
            return
        if step < t_i or (step < T - t_f and (step - t_i) % cfg.dyndora_prune_interval):
            return
        b = budget(step, cfg.dyndora_initial_rank, cfg.rank, t_i, t_f, T)
        scores = torch.cat([layer.dyndora_score for layer in layers])
        keep = min(scores.numel(), round(b * len(layers)))
        mask = torch.zeros_like(scores)
        mask[torch.topk(scores, keep).indices] = 1.0   # global: the lowest smoothed scores, any layer, go first
        for layer, m in zip(layers, mask.split([layer.dyndora_score.numel() for layer in layers])):
            layer.dyndora_mask.copy_(m)
            layer.dyndora_c.mul_(m)                    # gentle: a_i, b_i are kept


def live_ranks(model: nn.Module) -> dict[str, int]:
    """{module name: live components (its prune mask's sum)} for every dynamic-rank layer; one device sync."""
    layers = {name: layer for name, layer in adapter_layers(model).items() if isinstance(layer, DynDoraLayer)}
    if not layers:
        return {}
    counts = torch.stack([layer.dyndora_mask.sum() for layer in layers.values()]).tolist()
    return {name: int(round(c)) for name, c in zip(layers, counts)}
