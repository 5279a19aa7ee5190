"""Methods that act during training through the step hooks: Delta-LoRA and dynamic-rank DoRA.

Tiny MLPs built here, driven only through the public API (inject, step_hooks, parameter_groups,
save_adapter/load_adapter, merge/unmerge, weight_distance, live_ranks), against reference computations
written out in this file: the paper's in-place Delta-LoRA rule, DynDoRA's dense Eq. 6, hand-computed DEM.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lowrank
from lowrank import AdapterConfig, inject, step_hooks
from lowrank.methods.dynamic_rank import DynDoraLayer, budget, phases
from tests.nets import MLP
from training.common.tracking import write_rank_heatmap

TARGETS = ["inp", "mid", "out"]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def layer(model, name):
    return lowrank.adapter_layers(model)[name]


# ----- Delta-LoRA ---------------------------------------------------------------------------------

class InPlaceDeltaLoRA(nn.Module):
    """The paper's rule, literally (Algorithm 1): y = W x + s·B A x, and after optimizer step t > K
    W ← W + λ·s·(B_{t+1}A_{t+1} − B_t A_t), written into a W that has no gradient."""

    def __init__(self, pretrained, ours, ratio, K, scale):
        super().__init__()
        self.net, self.ratio, self.K, self.s = copy.deepcopy(pretrained), ratio, K, scale
        self.net.requires_grad_(False)
        self.A = nn.ParameterDict({n: nn.Parameter(layer(ours, n).lora_A.detach().clone()) for n in TARGETS})
        self.B = nn.ParameterDict({n: nn.Parameter(layer(ours, n).lora_B.detach().clone()) for n in TARGETS})

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


def deltalora(K=7, ratio=2.0, dtype=torch.float32):
    torch.manual_seed(6)
    pretrained = MLP().to(dtype)
    model = copy.deepcopy(pretrained)
    cfg = AdapterConfig(method="deltalora", rank=4, alpha=8.0, target_modules=TARGETS,
                        deltalora_ratio=ratio, deltalora_start_step=K)
    inject(model, cfg)
    return pretrained, model, cfg


def train(model, steps, lr=2e-2, x=None, target=None, start=1):
    """AdamW through parameter_groups and step_hooks, as every trainer does."""
    torch.manual_seed(0)
    x = torch.randn(8, 12) if x is None else x
    target = torch.randn(8, 8) if target is None else target
    opt = torch.optim.AdamW(lowrank.parameter_groups(model, lr=lr, weight_decay=0.01))
    hooks = step_hooks(model)
    for t in range(start, start + steps):
        (F.mse_loss(model(x).float(), target) + hooks.extra_loss()).backward()
        opt.step()
        opt.zero_grad()
        hooks.after_optimizer_step(t)
    return x, opt


# Both sides of the next test run in float64. The two compute the same W_eff by different roundings (ours:
# W_0 x + a rank-2r path; the rule: W written in place every step), and AdamW passes a relative gradient error
# δ straight into the step (m/√v is scale-free), so the error grows with the steps rather than staying at the
# unit roundoff. In fp32 (u = 2^-24 ≈ 6e-8) the gradients' relative error over 24 steps was 1e-5 on one CPU and
# 1.02e-4 on another (BLAS kernels differ in summation order): an amplification of up to ~2e3·u, which crossed
# the old 1e-4 bound. In float64 (u = 2^-53 ≈ 1.1e-16) the same amplification gives ~2e-13 (measured: ≤ 5e-14
# for the gradients, ≤ 2e-15 for the outputs); the bound 1e-10 leaves a factor ~500 for other machines.
F64_BOUND = 1e-10


@pytest.mark.parametrize("K", [0, 7])
def test_deltalora_equals_the_in_place_rule_over_adamw_steps(K):
    steps = 24
    pretrained, model, cfg = deltalora(K, dtype=torch.float64)
    model.double()   # the adapter too (created in fp32): both sides entirely in float64
    ref = InPlaceDeltaLoRA(pretrained, model, cfg.deltalora_ratio, K, cfg.scale)
    opt_a = torch.optim.AdamW(lowrank.parameter_groups(model, lr=2e-2, weight_decay=0.01))
    opt_b = torch.optim.AdamW(ref.parameters(), lr=2e-2, weight_decay=0.01)
    hooks = step_hooks(model)
    gen = torch.Generator().manual_seed(7)
    x, target = (torch.randn(8, d, generator=gen, dtype=torch.float64) for d in (12, 8))
    for t in range(1, steps + 1):
        ya, yb = model(x), ref(x)
        assert ya.dtype == yb.dtype == torch.float64
        assert rel_err(ya, yb) < F64_BOUND, f"step {t}"
        F.mse_loss(ya, target).backward()
        F.mse_loss(yb, target).backward()
        for n in TARGETS:   # LoRA's gradients: W_t is a constant in backward (and the input gradient sees W_t)
            lay = layer(model, n)
            assert rel_err(lay.lora_A.grad, ref.A[n].grad) < F64_BOUND, (t, n)
            assert rel_err(lay.lora_B.grad, ref.B[n].grad) < F64_BOUND, (t, n)
        before = ref.products()
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
        hooks.after_optimizer_step(t)
        ref.after_step(t, before)
        if t == K:   # the snapshot is taken at the end of step K: (A_K, B_K)
            assert torch.equal(layer(model, "mid").deltalora_A_start, layer(model, "mid").lora_A)
    assert rel_err(model(x), ref(x)) < F64_BOUND
    for n in TARGETS:
        w0 = pretrained.get_submodule(n).weight
        w_ref = ref.net.get_submodule(n).weight
        assert (w_ref - w0).norm() > 1e-2 * (cfg.scale * ref.B[n] @ ref.A[n]).norm()   # the rule was active
        assert torch.equal(layer(model, n).weight, w0)          # ours never writes W_0
        dense = (w_ref + cfg.scale * ref.B[n] @ ref.A[n] - w0).norm().item()
        assert lowrank.weight_distance(model)[n] == pytest.approx(dense, rel=F64_BOUND)
        relative = dense / w0.norm().item()
        # relative divides by ‖W_0‖ kept in fp32 (w0_norm, taken before the model went to float64): u32 ≈ 6e-8
        assert lowrank.weight_distance(model, relative=True)[n] == pytest.approx(relative, rel=1e-6)


def test_deltalora_w_has_no_gradient_or_optimizer_state():
    _, model, _ = deltalora(K=2)
    groups = lowrank.parameter_groups(model, lr=1e-3)
    in_groups = {id(p) for g in groups for p in g["params"]}
    weights = [layer(model, n).weight for n in TARGETS]
    assert all(not w.requires_grad and id(w) not in in_groups for w in weights)
    _, opt = train(model, 5)                       # past K: the W update is running
    assert len(opt.state) == 2 * len(TARGETS)      # A and B of each layer, nothing else
    assert all(id(p) in in_groups for p in opt.state)
    assert all(w.grad is None and not w.requires_grad for w in weights)


def test_deltalora_save_load_reproduces_the_trained_model(tmp_path):
    pretrained, model, _ = deltalora(K=3)
    x, _ = train(model, 10)
    y = model(x)
    lowrank.save_adapter(model, tmp_path)
    _, saved = lowrank.read_adapter(tmp_path)
    assert saved["mid.deltalora_started"].item() and "mid.deltalora_B_start" in saved   # the base change
    fresh = copy.deepcopy(pretrained)              # the untrained model
    lowrank.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(x), y)
    lowrank.merge(model)
    lowrank.merge(fresh)
    for n in TARGETS:
        assert torch.equal(model.get_submodule(n).weight, fresh.get_submodule(n).weight)


def test_deltalora_merge_unmerge_and_eject_are_exact():
    pretrained, model, cfg = deltalora(K=3)
    x, _ = train(model, 10)
    y = model(x)
    s, lam = cfg.scale, cfg.deltalora_ratio
    lowrank.merge(model)
    assert rel_err(model(x), y) < 1e-6
    for n in TARGETS:   # W_T + sB_T A_T = W_0 + (1+λ)s·B_T A_T − λs·B_K A_K, by hand in float64
        lay, w0 = layer(model, n), pretrained.get_submodule(n).weight.double()
        dense = w0 + (1 + lam) * s * lay.lora_B.double() @ lay.lora_A.double() \
            - lam * s * lay.deltalora_B_start.double() @ lay.deltalora_A_start.double()
        assert rel_err(lay.weight.double(), dense) < 1e-7
    lowrank.unmerge(model)
    assert rel_err(model(x), y) < 1e-6
    for n in TARGETS:
        torch.testing.assert_close(layer(model, n).weight, pretrained.get_submodule(n).weight, rtol=0, atol=1e-6)
    other = copy.deepcopy(pretrained)
    inject(other, cfg)
    train(other, 10)
    lowrank.eject(other)               # never merged: W_0 comes back bit for bit
    for n in TARGETS:
        assert torch.equal(other.get_submodule(n).weight, pretrained.get_submodule(n).weight)


def test_deltalora_on_a_1x1_conv_merges_and_reloads(tmp_path):
    torch.manual_seed(3)
    pretrained = nn.Sequential(nn.Conv2d(6, 10, 1), nn.Tanh(), nn.Conv2d(10, 4, 1))
    model = copy.deepcopy(pretrained)
    inject(model, AdapterConfig(method="deltalora", rank=2, target_modules=["0", "2"], deltalora_start_step=2))
    x = torch.randn(2, 6, 3, 3)
    opt = torch.optim.AdamW(lowrank.parameter_groups(model, lr=5e-2))
    hooks = step_hooks(model)
    for t in range(1, 7):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        hooks.after_optimizer_step(t)
    y = model(x)
    fresh = copy.deepcopy(pretrained)
    lowrank.save_adapter(model, tmp_path)
    lowrank.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(x), y)
    lowrank.merge(model)
    assert rel_err(model(x), y) < 1e-6 and rel_err(y, pretrained(x)) > 1e-3


def test_deltalora_leaves_half_precision_base_weights_bit_exact():
    """W_0 is never rewritten: with bf16 frozen weights (mixed precision) no rounding enters the base."""
    pretrained, model, cfg = deltalora(K=2, dtype=torch.bfloat16)
    x, _ = train(model, 6, x=torch.randn(8, 12, dtype=torch.bfloat16))
    for n in TARGETS:
        assert torch.equal(layer(model, n).weight, pretrained.get_submodule(n).weight)
    lay = layer(model, "inp")   # the adapter path still carries the full (1+λ)sBA − λsB_K A_K in fp32 factors
    dense = lay.weight.double() + lay.delta_weight().double()
    want = x.double() @ dense.T + lay.bias.double()
    assert rel_err(lay(x).double(), want) < 1e-2
    lowrank.eject(model)
    for n in TARGETS:
        assert torch.equal(model.get_submodule(n).weight, pretrained.get_submodule(n).weight)


def test_deltalora_started_flag_follows_every_load_path(tmp_path):
    pretrained, started, cfg = deltalora(K=2)
    x, _ = train(started, 5)
    fresh = copy.deepcopy(pretrained)
    inject(fresh, cfg)                               # not started: a plain LoRA forward
    fresh.load_state_dict(started.state_dict())      # torch's path
    assert torch.equal(fresh(x), started(x))
    again = copy.deepcopy(pretrained)
    inject(again, cfg)
    lowrank.save_adapter(started, tmp_path)
    lowrank.load_adapter(again, tmp_path)            # into an adapted model: load_adapter_state
    assert torch.equal(again(x), started(x))
    plain = copy.deepcopy(pretrained)
    inject(plain, cfg)
    started.load_state_dict(plain.state_dict())      # and back to not started
    assert torch.equal(started(x), plain(x))


def test_deltalora_refuses_to_snapshot_while_merged():
    _, model, _ = deltalora(K=1)
    lowrank.merge(model)
    with pytest.raises(lowrank.AdapterError, match="unmerge"):
        step_hooks(model).after_optimizer_step(1)


def test_deltalora_rejects_dropout():
    with pytest.raises(lowrank.ConfigError, match="dropout"):
        AdapterConfig(method="deltalora", dropout=0.1)


# ----- dynamic-rank DoRA --------------------------------------------------------------------------

def dyndora(**opts):
    torch.manual_seed(7)
    pretrained = MLP()
    model = copy.deepcopy(pretrained)
    cfg = AdapterConfig(method="dyndora", rank=2, target_modules=TARGETS, **opts)
    inject(model, cfg)
    return pretrained, model, cfg


def dense_weights(pretrained, model, scale):
    """DynDoRA Eq. 6 written out: W_0 + s·Σ_i c_i b_i a_iᵀ, one outer product per component."""
    out = {}
    for n in TARGETS:
        lay = layer(model, n)
        delta = sum(lay.dyndora_c[i] * torch.outer(lay.dyndora_B[:, i], lay.dyndora_A[i])
                    for i in range(lay.dyndora_c.numel()))
        out[n] = pretrained.get_submodule(n).weight + scale * delta
    return out


def test_budget_schedule_at_key_steps():
    b0, bT, ti, tf, T = 12, 8, 10, 20, 100
    assert budget(0, b0, bT, ti, tf, T) == b0
    assert budget(ti, b0, bT, ti, tf, T) == b0                     # the cubic starts at b0 ...
    mid = ti + (T - tf - ti) // 2
    assert budget(mid, b0, bT, ti, tf, T) == pytest.approx(bT + (b0 - bT) * 0.5 ** 3)
    assert budget(T - tf, b0, bT, ti, tf, T) == bT                 # ... and reaches bT (the seed's does not)
    assert budget(T, b0, bT, ti, tf, T) == bT
    values = [budget(t, b0, bT, ti, tf, T) for t in range(T + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))         # monotone decrement
    cfg = AdapterConfig(method="dyndora", rank=4, dyndora_total_steps=200)
    assert cfg.dyndora_initial_rank == 6 and phases(cfg) == (30, 100, 200)   # ceil(1.5r); 15 % / 50 % of T


def test_dyndora_identity_at_init():
    pretrained, model, cfg = dyndora()
    x = torch.randn(5, 12)
    assert torch.equal(model(x), pretrained(x))
    assert layer(model, "inp").dyndora_A.shape == (3, 12) and not layer(model, "inp").dyndora_c.any()
    assert all(d == 0 for d in lowrank.weight_distance(model).values())


def test_dyndora_forward_and_gradients_match_the_dense_equation():
    pretrained, model, cfg = dyndora(dyndora_total_steps=100, dyndora_dem=0.05)   # no pruning in 4 steps
    params = {k: nn.Parameter(v.detach().clone()) for k, v in model.named_parameters() if v.requires_grad}
    ref = {n: {p: params[f"{n}.dyndora_{p}"] for p in "ABc"} for n in TARGETS}
    opt_a = torch.optim.AdamW(lowrank.parameter_groups(model, lr=3e-2, weight_decay=0.01))
    opt_b = torch.optim.AdamW(params.values(), lr=3e-2, weight_decay=0.01)
    hooks = step_hooks(model)
    x, target = torch.randn(8, 12), torch.randn(8, 8)
    n_all = 3 * cfg.dyndora_initial_rank
    for t in range(1, 5):
        ya = model(x)
        W = {}
        for n in TARGETS:
            A, B, c = ref[n]["A"], ref[n]["B"], ref[n]["c"]
            W[f"{n}.weight"] = pretrained.get_submodule(n).weight + cfg.alpha / cfg.dyndora_initial_rank * sum(
                c[i] * torch.outer(B[:, i], A[i]) for i in range(c.numel()))
        yb = functional_call(pretrained, W, (x,))
        assert rel_err(ya, yb) < 1e-5, t
        dem = sum(r["A"][i].var() + r["B"][:, i].var() for r in ref.values() for i in range(r["c"].numel()))
        (F.mse_loss(ya, target) + hooks.extra_loss()).backward()
        (F.mse_loss(yb, target) + cfg.dyndora_dem * dem / n_all).backward()
        for name, p in params.items():
            got = dict(model.named_parameters())[name].grad
            assert rel_err(got, p.grad) < 1e-4, (t, name)
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
        hooks.after_optimizer_step(t)


def test_pruning_is_global_lowest_scores_first_and_restores():
    _, model, _ = dyndora(dyndora_initial_rank=3, dyndora_total_steps=10, dyndora_warmup_steps=0,
                          dyndora_final_steps=0, dyndora_prune_interval=1, dyndora_beta=1.0)  # β = 1: scores stay
    layers = list(lowrank.adapter_layers(model).values())
    A0 = [lay.dyndora_A.detach().clone() for lay in layers]
    with torch.no_grad():
        for lay in layers:
            lay.dyndora_c.fill_(1.0)
        layers[0].dyndora_score.copy_(torch.tensor([0.10, 0.50, 0.05]))
        layers[1].dyndora_score.copy_(torch.tensor([0.20, 0.01, 0.02]))
        layers[2].dyndora_score.copy_(torch.tensor([0.90, 0.80, 0.70]))
    # step 5 of 10: b = 2 + (3 − 2)(1 − 0.5)³ = 2.125 → keep round(6.375) = 6 of 9: the three lowest
    # scores overall go (0.05 in inp, 0.01 and 0.02 in mid); per layer it would have been 2/2/2
    DynDoraLayer.after_optimizer_step_all(layers, 5)
    assert [lay.dyndora_mask.tolist() for lay in layers] == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert lowrank.live_ranks(model) == {"inp": 2, "mid": 1, "out": 3}
    for lay, a0 in zip(layers, A0):   # gentle: c zeroed, a_i and b_i kept
        assert torch.equal(lay.dyndora_c, lay.dyndora_mask)
        assert torch.equal(lay.dyndora_A, a0)
    # mid's second component regrows and its score climbs: at the next prune step it is restored
    with torch.no_grad():
        layers[1].dyndora_c[1] = 0.3
        layers[1].dyndora_score[1] = 0.95
    DynDoraLayer.after_optimizer_step_all(layers, 6)   # b = 2 + 0.4³ → keep 6
    assert [lay.dyndora_mask.tolist() for lay in layers] == [[0, 1, 0], [1, 1, 0], [1, 1, 1]]
    assert layers[1].dyndora_c[1].item() == pytest.approx(0.3) and layers[0].dyndora_c[0].item() == 0


def test_importance_matches_dense_norms():
    _, model, _ = dyndora()
    lay = layer(model, "inp")
    with torch.no_grad():
        lay.dyndora_c.copy_(torch.randn_like(lay.dyndora_c))
    parts = [lay.dyndora_c[i] * torch.outer(lay.dyndora_B[:, i], lay.dyndora_A[i]) for i in range(3)]
    total = sum(parts).norm()
    for s, part in zip(lay.importance(), parts):
        assert s.item() == pytest.approx((part.norm() / total).item(), rel=1e-5)


def test_dem_value_and_gradient_by_hand():
    _, model, cfg = dyndora(dyndora_dem=0.3)
    layers = list(lowrank.adapter_layers(model).values())
    loss = step_hooks(model).extra_loss()
    n = sum(lay.dyndora_c.numel() for lay in layers)          # all components of the model (9)
    unbiased = population = 0.0
    for lay in layers:   # each a_i (row of A) and b_i (column of B), squared deviations summed by hand
        for i in range(lay.dyndora_c.numel()):
            for v in (lay.dyndora_A[i], lay.dyndora_B[:, i]):
                ss = ((v - v.mean()) ** 2).sum().item()
                unbiased += ss / (v.numel() - 1)
                population += ss / v.numel()
    assert loss.item() == pytest.approx(0.3 * unbiased / n, rel=1e-5)      # torch.var's default: ÷(d−1)
    assert loss.item() != pytest.approx(0.3 * population / n, rel=1e-3)
    loss.backward()
    a = layers[0].dyndora_A[0].detach()
    expected = 0.3 / n * 2 * (a - a.mean()) / (a.numel() - 1)           # d Var(a)/da = 2(a − ā)/(d − 1)
    torch.testing.assert_close(layers[0].dyndora_A.grad[0], expected, rtol=1e-5, atol=1e-9)
    assert layers[0].dyndora_c.grad is None                              # DEM does not touch c
    _, plain, _ = dyndora(dyndora_dem=0.0)
    assert step_hooks(plain).extra_loss() == 0.0


def test_average_live_rank_reaches_r_and_the_prune_state_round_trips(tmp_path):
    T, ti, tf, every = 40, 5, 10, 3
    pretrained, model, cfg = dyndora(dyndora_total_steps=T, dyndora_warmup_steps=ti, dyndora_final_steps=tf,
                                     dyndora_prune_interval=every)
    hooks = step_hooks(model)
    opt = torch.optim.AdamW(lowrank.parameter_groups(model, lr=3e-2))
    x, target = torch.randn(16, 12), torch.randn(16, 8)
    history, masks = {}, {}
    for t in range(1, T + 1):
        (F.mse_loss(model(x), target) + hooks.extra_loss()).backward()
        opt.step()
        opt.zero_grad()
        hooks.after_optimizer_step(t)
        history[t] = sum(lowrank.live_ranks(model).values()) / 3
        masks[t] = torch.cat([lay.dyndora_mask for lay in lowrank.adapter_layers(model).values()])
        if t > T - tf:   # final phase: pruned c_i re-zeroed after every step
            for lay in lowrank.adapter_layers(model).values():
                assert torch.all(lay.dyndora_c[lay.dyndora_mask == 0] == 0)
        if t >= ti and ((t - ti) % every == 0 or t == T - tf):   # each prune step meets the budget
            assert history[t] == round(budget(t, 3, 2, ti, tf, T) * 3) / 3, t
    assert all(history[t] == cfg.dyndora_initial_rank for t in range(1, ti + 1))   # warm-up: nothing pruned
    assert history[T - tf] == cfg.rank and history[T] == cfg.rank                  # the target average
    assert all(torch.equal(masks[t], masks[T - tf]) for t in range(T - tf, T + 1))  # allocation fixed
    # checkpoint round trip: masks and smoothed scores come back with the adapter
    lowrank.save_adapter(model, tmp_path)
    fresh = copy.deepcopy(pretrained)
    lowrank.load_adapter(fresh, tmp_path)
    assert lowrank.live_ranks(fresh) == lowrank.live_ranks(model)
    for n in TARGETS:
        assert torch.equal(layer(fresh, n).dyndora_score, layer(model, n).dyndora_score)
        assert torch.equal(layer(fresh, n).dyndora_mask, layer(model, n).dyndora_mask)
    assert torch.equal(fresh(x), model(x))
    with torch.no_grad():   # a resumed run prunes exactly as the uninterrupted one
        for m in (model, fresh):
            for lay in lowrank.adapter_layers(m).values():
                lay.dyndora_c.add_(0.01)
    step_hooks(model).after_optimizer_step(T + 1)
    step_hooks(fresh).after_optimizer_step(T + 1)
    for n in TARGETS:
        assert torch.equal(layer(fresh, n).dyndora_c, layer(model, n).dyndora_c)


def test_dyndora_merge_unmerge_and_distance():
    pretrained, model, cfg = dyndora(dyndora_total_steps=8, dyndora_prune_interval=1)
    x, _ = train(model, 8, lr=3e-2)
    y = model(x)
    assert sum(lowrank.live_ranks(model).values()) == 3 * cfg.rank   # pruning happened
    with torch.no_grad():
        dense = dense_weights(pretrained, model, cfg.alpha / cfg.dyndora_initial_rank)
    for n in TARGETS:
        want = (dense[n] - pretrained.get_submodule(n).weight).norm().item()
        assert lowrank.weight_distance(model)[n] == pytest.approx(want, rel=1e-5)
    lowrank.merge(model)
    assert rel_err(model(x), y) < 1e-6
    for n in TARGETS:
        assert rel_err(model.get_submodule(n).weight, dense[n]) < 1e-6
    lowrank.unmerge(model)
    for n in TARGETS:
        torch.testing.assert_close(layer(model, n).weight, pretrained.get_submodule(n).weight, rtol=0, atol=1e-6)
    assert rel_err(model(x), y) < 1e-6


@pytest.mark.parametrize("opts", [{"dyndora_warmup_steps": 60, "dyndora_final_steps": 50},
                                  {"dyndora_prune_interval": 0}, {"dyndora_beta": 1.5}])
def test_dyndora_rejects_inconsistent_schedules(opts):
    with pytest.raises(lowrank.ConfigError, match="dyndora"):
        dyndora(dyndora_total_steps=100, **opts)


def test_live_ranks_heatmap(tmp_path):
    _, lora, _ = deltalora()
    assert lowrank.live_ranks(lora) == {}                       # no dynamic-rank layers: nothing reported
    records = [(s, {"inp": 3 - s // 3, "mid": 3, "out": 2}) for s in range(0, 8)]
    path = tmp_path / "ranks.png"
    path.write_bytes(b"stale")
    assert write_rank_heatmap(records, path) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["ranks.png"]   # the temporary file was renamed away
    with pytest.raises(ValueError, match="records"):
        write_rank_heatmap([], tmp_path / "empty.png")
