"""Methods that act during training through the step hooks: Delta-LoRA and dynamic-rank DoRA."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowrank
from lowrank import AdapterConfig, inject, step_hooks
from lowrank.methods.dynamic_rank import DynDoraLayer, budget
from tests.test_core_methods import MLP, rel_err

TARGETS = ["inp", "mid", "out"]


# ----- Delta-LoRA ---------------------------------------------------------------------------------

class InPlaceDeltaLoRA(nn.Module):
    """The paper's rule, literally (Algorithm 1): y = W x + s·B A x, and after optimizer step t > K
    W ← W + λ·s·(B_{t+1}A_{t+1} − B_t A_t) on a W that has no gradient."""

    def __init__(self, pretrained, ours, ratio, K, scale):
        super().__init__()
        self.net, self.ratio, self.K, self.s = copy.deepcopy(pretrained), ratio, K, scale
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for n in TARGETS:
            layer = ours.get_submodule(n)
            self.A[n] = nn.Parameter(layer.lora_A.detach().clone())
            self.B[n] = nn.Parameter(layer.lora_B.detach().clone())
        self.net.requires_grad_(False)

    def forward(self, x):
        hooks = [self.net.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: o + self.s * i[0] @ self.A[n].T @ self.B[n].T) for n in TARGETS]
        try:
            return self.net(x)
        finally:
            for h in hooks:
                h.remove()

    def products(self):
        return {n: (self.B[n] @ self.A[n]).detach().clone() for n in TARGETS}

    @torch.no_grad()
    def after_step(self, t, before):
        if t > self.K:
            for n in TARGETS:
                self.net.get_submodule(n).weight += self.ratio * self.s * (self.B[n] @ self.A[n] - before[n])


def deltalora(K=7, ratio=2.0):
    torch.manual_seed(6)
    pretrained = MLP()
    model = copy.deepcopy(pretrained)
    cfg = AdapterConfig(method="deltalora", rank=4, alpha=8.0, target_modules=TARGETS,
                        deltalora_ratio=ratio, deltalora_start_step=K)
    inject(model, cfg)
    return pretrained, model, cfg


def test_deltalora_equals_the_in_place_rule_over_adamw_steps():
    K, steps = 7, 24
    pretrained, model, cfg = deltalora(K)
    ref = InPlaceDeltaLoRA(pretrained, model, cfg.deltalora_ratio, K, cfg.scale)
    opt_a = torch.optim.AdamW(lowrank.parameter_groups(model, lr=2e-2))
    opt_b = torch.optim.AdamW(ref.parameters(), lr=2e-2, weight_decay=0.0)  # parameter_groups: no decay
    hooks = step_hooks(model)
    x, target = torch.randn(8, 12), torch.randn(8, 8)
    for t in range(1, steps + 1):
        ya, yb = model(x), ref(x)
        assert rel_err(ya, yb) < 1e-5, f"step {t}"
        F.mse_loss(ya, target).backward()
        F.mse_loss(yb, target).backward()
        for n in TARGETS:   # LoRA's gradients: W_t's change is a constant in backward
            layer = model.get_submodule(n)
            assert rel_err(layer.lora_A.grad, ref.A[n].grad) < 1e-4, (t, n)
            assert rel_err(layer.lora_B.grad, ref.B[n].grad) < 1e-4, (t, n)
            assert layer.weight.grad is None and not layer.weight.requires_grad
        before = ref.products()
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
        hooks.after_optimizer_step(t)
        ref.after_step(t, before)
    # W really moved (the rule was active), and the distance is the dense one
    for n in TARGETS:
        w_ref = ref.net.get_submodule(n).weight
        assert (w_ref - pretrained.get_submodule(n).weight).norm() > 1e-3
        W_eff = w_ref + cfg.scale * ref.B[n] @ ref.A[n]
        dense = (W_eff - pretrained.get_submodule(n).weight).norm().item()
        assert lowrank.weight_distance(model)[n] == pytest.approx(dense, rel=1e-4)


def test_deltalora_w_has_no_gradient_or_optimizer_state():
    _, model, _ = deltalora()
    groups = lowrank.parameter_groups(model, lr=1e-3)
    in_groups = {id(p) for g in groups for p in g["params"]}
    for n in TARGETS:
        w = model.get_submodule(n).weight
        assert not w.requires_grad and id(w) not in in_groups
    opt = torch.optim.AdamW(groups)
    F.mse_loss(model(torch.randn(3, 12)), torch.zeros(3, 8)).backward()
    opt.step()
    assert all(id(p) in in_groups for p in opt.state)
    assert all(model.get_submodule(n).weight.grad is None for n in TARGETS)


def train_deltalora(model, steps, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(lowrank.parameter_groups(model, lr=2e-2))
    hooks = step_hooks(model)
    x = torch.randn(8, 12)
    for t in range(1, steps + 1):
        F.mse_loss(model(x), torch.ones(8, 8)).backward()
        opt.step()
        opt.zero_grad()
        hooks.after_optimizer_step(t)
    return x


def test_deltalora_save_load_merge_include_the_base_change(tmp_path):
    pretrained, model, _ = deltalora(K=3)
    x = train_deltalora(model, 10)
    y = model(x)
    lowrank.save_adapter(model, tmp_path)
    fresh = copy.deepcopy(pretrained)
    lowrank.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(x), y)                      # the base change travels with the adapter
    lowrank.merge(model)
    lowrank.merge(fresh)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    for n in TARGETS:
        assert torch.equal(model.get_submodule(n).weight, fresh.get_submodule(n).weight)
    lowrank.unmerge(model)
    lowrank.eject(model)
    for n in TARGETS:   # eject restores W0: the fold is undone too
        torch.testing.assert_close(model.get_submodule(n).weight, pretrained.get_submodule(n).weight,
                                   rtol=0, atol=1e-6)


def test_deltalora_rejects_dropout():
    with pytest.raises(lowrank.ConfigError, match="dropout"):
        AdapterConfig(method="deltalora", dropout=0.1)


# ----- dynamic-rank DoRA --------------------------------------------------------------------------

def test_budget_schedule_at_key_steps():
    b0, bT, ti, tf, T = 12, 8, 10, 20, 100
    assert budget(0, b0, bT, ti, tf, T) == b0
    assert budget(ti - 1, b0, bT, ti, tf, T) == b0
    assert budget(ti, b0, bT, ti, tf, T) == b0                     # the cubic starts at b0 ...
    mid = ti + (T - tf - ti) // 2
    assert budget(mid, b0, bT, ti, tf, T) == pytest.approx(bT + (b0 - bT) * 0.5 ** 3)
    assert budget(T - tf, b0, bT, ti, tf, T) == bT                 # ... and reaches bT (the seed's does not)
    assert budget(T, b0, bT, ti, tf, T) == bT
    values = [budget(t, b0, bT, ti, tf, T) for t in range(T + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))         # monotone decrement


def dyndora_model(**opts):
    torch.manual_seed(7)
    model = MLP()
    cfg = AdapterConfig(method="dyndora", rank=2, target_modules=TARGETS, **opts)
    inject(model, cfg)
    return model, cfg


def test_pruning_is_global_lowest_scores_first():
    model, cfg = dyndora_model(dyndora_initial_rank=3, dyndora_total_steps=10, dyndora_warmup_steps=0,
                               dyndora_final_steps=0, dyndora_prune_interval=1, dyndora_beta=1.0)
    layers = list(lowrank.adapter_layers(model).values())
    with torch.no_grad():
        for layer in layers:
            layer.dyndora_c.fill_(1.0)
        # known smoothed scores (β = 1 keeps them): the 'out' layer holds the three best components
        layers[0].dyndora_score.copy_(torch.tensor([0.10, 0.50, 0.05]))
        layers[1].dyndora_score.copy_(torch.tensor([0.20, 0.01, 0.02]))
        layers[2].dyndora_score.copy_(torch.tensor([0.90, 0.80, 0.70]))
    step = 5
    b = budget(step, 3, 2, 0, 0, 10)
    DynDoraLayer.after_optimizer_step_all(layers, step)
    keep = round(b * 3)
    scores = torch.cat([layer.dyndora_score for layer in layers])
    expected = torch.zeros(9)
    expected[scores.argsort(descending=True)[:keep]] = 1
    got = torch.cat([layer.dyndora_mask for layer in layers])
    assert torch.equal(got, expected)
    assert got[:3].sum() != got[6:].sum()                          # allocation differs across layers
    for layer in layers:                                           # gentle: c zeroed, a_i and b_i kept
        assert torch.equal(layer.dyndora_c, layer.dyndora_mask)
        assert layer.dyndora_A.abs().sum(1).min() > 0


def test_importance_matches_dense_norms():
    model, _ = dyndora_model()
    layer = model.inp
    with torch.no_grad():
        layer.dyndora_c.copy_(torch.randn_like(layer.dyndora_c))
    dW = sum(layer.dyndora_c[i] * torch.outer(layer.dyndora_B[:, i], layer.dyndora_A[i]) for i in range(3))
    for i, s in enumerate(layer.importance()):
        part = layer.dyndora_c[i] * torch.outer(layer.dyndora_B[:, i], layer.dyndora_A[i])
        assert s.item() == pytest.approx((part.norm() / dW.norm()).item(), rel=1e-5)


def test_dem_value_and_gradient():
    model, cfg = dyndora_model(dyndora_dem=0.3)
    layers = list(lowrank.adapter_layers(model).values())
    hooks = step_hooks(model)
    loss = hooks.extra_loss()
    n = sum(layer.dyndora_c.numel() for layer in layers)
    by_hand = 0.0
    for layer in layers:   # population variance of each a_i (row of A) and b_i (column of B)
        for i in range(layer.dyndora_c.numel()):
            a, b = layer.dyndora_A[i], layer.dyndora_B[:, i]
            by_hand = by_hand + ((a - a.mean()) ** 2).mean() + ((b - b.mean()) ** 2).mean()
    assert loss.item() == pytest.approx(0.3 * by_hand.item() / n, rel=1e-5)
    loss.backward()
    a = layers[0].dyndora_A[0].detach()
    expected = 0.3 / n * 2 * (a - a.mean()) / a.numel()            # d Var(a)/da = 2(a − ā)/d
    torch.testing.assert_close(layers[0].dyndora_A.grad[0], expected, rtol=1e-5, atol=1e-8)
    model2, _ = dyndora_model(dyndora_dem=0.0)
    assert step_hooks(model2).extra_loss() == 0.0


def test_average_live_rank_reaches_r_and_stays_fixed(tmp_path):
    T = 40
    model, cfg = dyndora_model(dyndora_total_steps=T, dyndora_warmup_steps=5, dyndora_final_steps=10,
                               dyndora_prune_interval=3)
    hooks = step_hooks(model)
    opt = torch.optim.AdamW(lowrank.parameter_groups(model, lr=3e-2))
    x, target = torch.randn(16, 12), torch.randn(16, 8)
    history = []
    for t in range(1, T + 1):
        (F.mse_loss(model(x), target) + hooks.extra_loss()).backward()
        opt.step()
        opt.zero_grad()
        hooks.after_optimizer_step(t)
        ranks = lowrank.live_ranks(model)
        history.append(ranks)
        if t == T - cfg.dyndora_final_steps:
            frozen = {n: layer.dyndora_mask.clone() for n, layer in lowrank.adapter_layers(model).items()}
    assert sum(history[0].values()) / 3 == cfg.dyndora_initial_rank          # warm-up: nothing pruned
    assert sum(history[-1].values()) / 3 == cfg.rank                          # the target average
    for n, layer in lowrank.adapter_layers(model).items():                    # final phase: allocation fixed
        assert torch.equal(layer.dyndora_mask, frozen[n])
        assert torch.all(layer.dyndora_c[layer.dyndora_mask == 0] == 0)
    # checkpoint round trip: masks and smoothed scores come back
    lowrank.save_adapter(model, tmp_path)
    torch.manual_seed(7)   # the same pretrained MLP as dyndora_model() built
    fresh = MLP()
    lowrank.load_adapter(fresh, tmp_path)
    assert lowrank.live_ranks(fresh) == history[-1]
    for n, layer in lowrank.adapter_layers(fresh).items():
        assert torch.equal(layer.dyndora_score, lowrank.adapter_layers(model)[n].dyndora_score)
    assert torch.equal(fresh(x), model(x))


def test_live_ranks_heatmap(tmp_path):
    from training.common.logging import write_rank_heatmap
    records = [(s, {"a": 3 - s // 2, "b": 3}) for s in range(0, 6)]
    out = write_rank_heatmap(records, tmp_path / "ranks.png")
    assert out.exists() and out.stat().st_size > 1000
    assert not list(tmp_path.glob("*.tmp"))
