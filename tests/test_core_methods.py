"""Every method against its dense paper-equation reference, plus the protocol's invariants.

The matrix: (method, options) x (nn.Linear, 1x1 nn.Conv2d). Each case injects into a tiny model,
perturbs the adapter off its initial point where needed (so gradients are not trivially zero), and
trains it and a dense reference side by side with AdamW.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowrank
from lowrank import AdapterConfig, inject
from lowrank.methods.ether import rank1_update
from tests.nets import MLP
from tests.reference import REFERENCES, block_householder

CASES = [
    ("lora", {}),
    ("lora", {"alpha": 16.0}),
    ("dora", {}),
    ("dora", {"dora_detach_norm": False}),
    ("dora", {"dora_fixed_magnitude": True}),
    ("delora", {"delora_init": "subtract", "delora_norm": "column"}),
    ("delora", {"delora_init": "subtract", "delora_norm": "frobenius"}),
    ("delora", {"delora_init": "subtract", "delora_norm": "none"}),
    ("delora", {"delora_init": "zero_b", "delora_norm": "column"}),
    ("delora", {"delora_init": "zero_b", "delora_norm": "frobenius"}),
    ("delora", {"delora_init": "zero_b", "delora_norm": "none"}),
    ("ether", {}),
    ("ether", {"ether_blocks": 2}),
    ("etherplus", {}),
    ("etherplus", {"etherplus_one_sided": True}),
    ("etherplus", {"ether_blocks": 4}),
    ("dyndora", {}),
    ("dyndora", {"dyndora_initial_rank": 8}),
    ("mult_relaxed", {}),
    ("mult_relaxed", {"mult_lambda": -0.5}),
    ("mult_highrank", {}),
    ("mult_highrank", {"mult_lambda": 5.0}),
    ("mult_bounded", {}),
]
IDS = [m + "-" + "-".join(f"{k}={v}" for k, v in o.items()) for m, o in CASES]


def test_every_registered_method_has_cases_and_a_reference():
    """A method added to lowrank.METHODS joins this matrix (deltalora's steps are in test_training_methods)."""
    assert {m for m, _ in CASES} | {"deltalora"} == set(lowrank.METHODS) == set(REFERENCES)
    for cls in lowrank.METHODS.values():
        assert cls.summary and "\n" not in cls.summary and cls.default_learning_rate > 0


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Conv2d(8, 16, 1)
        self.proj_out = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.proj_out(torch.tanh(self.proj_in(x)))


def make(kind):
    torch.manual_seed(1)
    if kind == "linear":
        return MLP(), ["inp", "mid", "out"], torch.randn(6, 12)
    return ConvNet(), ["proj_in", "proj_out"], torch.randn(2, 8, 3, 3)


def adapted(method, opts, kind):
    model, targets, x = make(kind)
    pretrained = copy.deepcopy(model)
    cfg = AdapterConfig(method=method, rank=4, target_modules=targets, **opts)
    names = inject(model, cfg)
    return model, pretrained, cfg, names, x


def perturb(model):
    """Move off the initial point (B = 0 etc.) so every parameter gets a gradient."""
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in lowrank.adapter_layers(model).values():
            for name, p in layer.named_parameters():
                if p.requires_grad and not name.startswith("base."):
                    p.add_(0.1 * torch.randn_like(p) * (p.abs().mean() + 1.0))


class Reference(nn.Module):
    """The same network, with each adapted layer computed densely from the paper equation."""

    def __init__(self, model, pretrained, cfg):
        super().__init__()
        self.pretrained, self.cfg = pretrained, cfg
        self.layers = lowrank.adapter_layers(model)
        self.params = nn.ModuleDict()
        for name, layer in self.layers.items():
            holder = nn.Module()
            for k, v in layer.named_parameters():
                if not k.startswith("base."):
                    holder.register_parameter(k, nn.Parameter(v.detach().clone(), requires_grad=v.requires_grad))
            for k, v in layer.named_buffers():
                if not k.startswith("base.") and k.startswith(layer.prefix):
                    holder.register_buffer(k, v.detach().clone())
            self.params[name.replace(".", "_")] = holder
        for p in self.pretrained.parameters():
            p.requires_grad_(False)

    def tensors(self, name):
        holder = self.params[name.replace(".", "_")]
        return dict(holder.named_parameters()) | dict(holder.named_buffers())

    def weight(self, name):
        base = self.pretrained.get_submodule(name)
        W0 = base.weight.reshape(base.weight.shape[0], -1)
        return REFERENCES[self.cfg.method](self.tensors(name), W0, self.cfg)

    def forward(self, x):
        handles = []
        for name in self.layers:
            base = self.pretrained.get_submodule(name)
            W = self.weight(name)

            def hook(mod, inp, out, W=W):
                if isinstance(mod, nn.Conv2d):
                    return F.conv2d(inp[0], W[:, :, None, None], mod.bias)
                return F.linear(inp[0], W, mod.bias)
            handles.append(base.register_forward_hook(hook))
        try:
            return self.pretrained(x)
        finally:
            for h in handles:
                h.remove()


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("method,opts", CASES, ids=IDS)
def test_matches_dense_reference_through_adamw(method, opts, kind):
    model, pretrained, cfg, _, x = adapted(method, opts, kind)
    perturb(model)
    ref = Reference(model, pretrained, cfg)
    ours_params = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p for p in ref.params.parameters() if p.requires_grad]
    assert len(ours_params) == len(ref_params) > 0
    opt_a = torch.optim.AdamW(ours_params, lr=1e-2)
    opt_b = torch.optim.AdamW(ref_params, lr=1e-2)
    target = torch.randn_like(model(x))
    # DeLoRA divides by ‖b_i‖‖a_i‖ (and the subtract init cancels two large terms), so rounding
    # differences between two correct implementations grow a little faster over AdamW steps.
    tol = 1e-4 if method == "delora" else 1e-5
    for step in range(4):
        ya, yb = model(x), ref(x)
        assert rel_err(ya, yb) < 1e-5, f"step {step}: outputs differ"
        F.mse_loss(ya, target).backward()
        F.mse_loss(yb, target).backward()
        for (na, pa), pb in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], ref_params):
            assert pa.grad is not None and pb.grad is not None, na
            # norm-relative: λ's gradient is a sum of O(1) terms that nearly cancel (summation order)
            assert (pa.grad - pb.grad).norm() <= tol * pb.grad.norm() + 1e-6, f"step {step}: grad of {na}"
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()


@pytest.mark.parametrize("method,opts", CASES, ids=IDS)
def test_identity_at_init_except_ether(method, opts):
    model, pretrained, cfg, _, x = adapted(method, opts, "linear")
    err = rel_err(model(x), pretrained(x))
    if method == "ether":
        assert err > 1e-2  # a reflection is not the identity: that is the method
    else:
        # exact up to fp32 rounding (DeLoRA's subtract init cancels ΔW(t=0) − ΔW(0) inside one GEMM)
        assert err < 1e-5


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("method,opts", CASES, ids=IDS)
def test_merge_unmerge_distance_and_frozen_base(method, opts, kind):
    model, pretrained, cfg, names, x = adapted(method, opts, kind)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(lowrank.parameter_groups(model, lr=3e-2), lr=3e-2)
    target = torch.randn_like(model(x))
    for _ in range(5):
        F.mse_loss(model(x), target).backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
        opt.step()
        opt.zero_grad()
    # only adapter parameters changed; every trainable one did
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, adapter_before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, base_before[n]), f"frozen {n} changed"

    # weight_distance == ‖W_merged − W_pretrained‖_F, densely
    y = model(x).detach()
    dist = lowrank.weight_distance(model)
    rel = lowrank.weight_distance(model, relative=True)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    lowrank.merge(model)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    for n in names:
        merged = model.get_submodule(n).weight.reshape(weights[n].shape[0], -1)
        w0 = pretrained.get_submodule(n).weight.reshape(weights[n].shape[0], -1)
        dense = (merged.double() - w0.double()).norm().item()
        assert dist[n] == pytest.approx(dense, rel=1e-4, abs=2e-6), n
        assert rel[n] == pytest.approx(dense / w0.double().norm().item(), rel=1e-4, abs=2e-6)
    lowrank.unmerge(model)
    for n in names:
        torch.testing.assert_close(model.get_submodule(n).weight, weights[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opts", [o for m, o in CASES if m == "delora"],
                         ids=[i for i, (m, _) in zip(IDS, CASES) if m == "delora"])
def test_delora_bound_holds_through_training(opts):
    """‖W_eff − W̄‖_F ≤ |λ|·N (zero_b) or (|λ| + |λ0|)·N (subtract), N = max column norm / ‖W̄‖_F / 1."""
    model, pretrained, cfg, names, x = adapted("delora", opts, "linear")
    opt = torch.optim.AdamW(lowrank.parameter_groups(model, lr=0.3, lambda_lr=0.3), lr=0.3)
    target = 10 * torch.randn_like(model(x))   # far away: pushes the update against its boundary
    ratios = []
    for _ in range(40):
        F.mse_loss(model(x), target).backward()
        opt.step()
        opt.zero_grad()
        for n in names:
            layer = model.get_submodule(n)
            w0 = pretrained.get_submodule(n).weight.detach()
            dense = (layer.weight + layer.merge_delta() - w0).norm().item()
            lam, lam0 = abs(layer.delora_lambda.item()), abs(getattr(layer, "delora_lambda0", torch.zeros(1)).item())
            N = {"column": w0.norm(dim=0).max().item(), "frobenius": w0.norm().item(), "none": 1.0}[cfg.delora_norm]
            radius = (lam + lam0) * N
            assert dense <= radius * (1 + 1e-5) + 1e-6
            assert layer.bound() == pytest.approx(radius, rel=1e-5)
            ratios.append(dense / radius)
    assert max(ratios) > 0.05  # the test reaches a meaningful part of the ball


def applied_sides(layer, pretrained_layer):
    """(H_out, H_in) as the layer's own code applies them (its rank-1 updates run on an identity), checked
    to reproduce the layer's forward: y = x (H_out W0 H_in)ᵀ + b. H_in is I for one-sided layers."""
    x = torch.randn(5, layer.in_features)
    H_out = rank1_update(torch.eye(layer.out_features), layer.out_terms()).detach()
    two = getattr(layer, "two_sided", False)
    eye_in = torch.eye(layer.in_features)
    H_in = rank1_update(eye_in, layer.in_terms()).detach() if two else eye_in
    W0 = pretrained_layer.weight.detach()
    torch.testing.assert_close(layer(x).detach(), F.linear(x, H_out @ W0 @ H_in, pretrained_layer.bias),
                               atol=1e-5, rtol=1e-5)
    return H_out, H_in


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_ether_is_orthogonal_and_keeps_singular_values(blocks):
    model, pretrained, cfg, names, x = adapted("ether", {"ether_blocks": blocks}, "linear")
    perturb(model)
    for n in names:
        H, _ = applied_sides(model.get_submodule(n), pretrained.get_submodule(n))
        torch.testing.assert_close(H, block_householder([(-2.0, model.get_submodule(n).ether_u.detach())], None),
                                   atol=1e-6, rtol=0)                      # the paper's H = I − 2ûûᵀ per block
        torch.testing.assert_close(H.T @ H, torch.eye(H.shape[0]), atol=1e-5, rtol=0)
        m = H.shape[0] // blocks
        for b in range(blocks):  # ‖H − I‖_F = 2 per block, and nothing outside the blocks
            blk = H[b * m:(b + 1) * m, b * m:(b + 1) * m]
            assert (blk - torch.eye(m)).norm().item() == pytest.approx(2.0, rel=1e-5)
        diagonal = torch.block_diag(*[H[b * m:(b + 1) * m, b * m:(b + 1) * m] for b in range(blocks)])
        assert (H - diagonal).abs().max() == 0
    lowrank.merge(model)
    for n in names:
        s_merged = torch.linalg.svdvals(model.get_submodule(n).weight.double())
        s0 = torch.linalg.svdvals(pretrained.get_submodule(n).weight.double())
        torch.testing.assert_close(s_merged, s0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opts", [{}, {"ether_blocks": 4}, {"etherplus_one_sided": True}])
def test_etherplus_relaxes_orthogonality_within_bound(opts):
    model, pretrained, cfg, names, x = adapted("etherplus", opts, "linear")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.2)
    target = torch.randn_like(model(x))
    for _ in range(15):
        F.mse_loss(model(x), target).backward()
        opt.step()
        opt.zero_grad()
    worst, non_orthogonal = 0.0, False
    for n in names:
        layer = model.get_submodule(n)
        sides = applied_sides(layer, pretrained.get_submodule(n))
        names_uv = [("ether_u", "ether_v")] + ([] if cfg.etherplus_one_sided else [("ether_u_in", "ether_v_in")])
        for H, (u, v) in zip(sides, names_uv):   # H⁺ = I − ûûᵀ + v̂v̂ᵀ per block, as the paper writes it
            ref = block_householder([(-1.0, getattr(layer, u).detach()), (1.0, getattr(layer, v).detach())], None)
            torch.testing.assert_close(H, ref, atol=1e-6, rtol=0)
            m = H.shape[0] // cfg.ether_blocks
            eye = torch.eye(H.shape[0])
            non_orthogonal |= not torch.allclose(H.T @ H, eye, atol=1e-3)
            for b in range(cfg.ether_blocks):
                d = (H - eye)[b * m:(b + 1) * m, b * m:(b + 1) * m].norm().item()
                assert d <= 2.0 + 1e-6
                worst = max(worst, d)
        assert max(layer.reflection_distance()) == pytest.approx(max(
            (H - torch.eye(H.shape[0]))[b * m:(b + 1) * m, b * m:(b + 1) * m].norm().item()
            for H in sides[:1 + (not cfg.etherplus_one_sided)] for m in [H.shape[0] // cfg.ether_blocks]
            for b in range(cfg.ether_blocks)), rel=1e-4, abs=1e-6)
    assert worst > 0.01 and non_orthogonal  # training moved H⁺ away from I, and it is no rotation


def test_only_adapter_parameters_are_trainable_and_named_by_method():
    for method in lowrank.METHODS:
        model, _, cfg, names, _ = adapted(method, {}, "linear")
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable, method
        prefix = lowrank.METHODS[method].prefix
        assert all(n.rsplit(".", 1)[-1].startswith(prefix) for n in trainable), (method, trainable)


def test_parameter_groups_separate_lambda():
    model, _, _, names, _ = adapted("delora", {}, "linear")
    groups = lowrank.parameter_groups(model, lr=1e-3, lambda_lr=1e-2)
    by_name = {g["name"]: g for g in groups}
    assert by_name["lambda"]["lr"] == 1e-2 and len(by_name["lambda"]["params"]) == len(names)
    assert by_name["adapter"]["lr"] == 1e-3 and len(by_name["adapter"]["params"]) == 2 * len(names)


def test_etherplus_token_heavy_path_equals_the_reflection_path():
    """Two-sided ETHER+ switches to W + UV (rank 4n) once tokens ≥ out: same outputs and gradients as
    applying H̃⁺ to x and H⁺ to the output, token by token (few tokens take the reflection path)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    inject(model, AdapterConfig(method="etherplus", target_modules=["0"], ether_blocks=2))
    perturb(model)
    layer = model[0]
    x = torch.randn(3, 8, 12)                    # 24 tokens ≥ 10 outputs: the low-rank path
    assert x.numel() >= layer.in_features * layer.out_features

    def outputs_and_grads(split):
        layer.zero_grad()
        y = torch.cat([model(t) for t in x.split(1, dim=1)], dim=1) if split else model(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), [p.grad.clone() for p in layer.parameters() if p.requires_grad]

    y_fast, g_fast = outputs_and_grads(split=False)
    y_refl, g_refl = outputs_and_grads(split=True)  # 3 tokens at a time < 10 outputs: the reflections
    assert rel_err(y_fast, y_refl) < 1e-6
    assert len(g_fast) == 4 and all(rel_err(a, b) < 1e-5 for a, b in zip(g_fast, g_refl))


@pytest.mark.parametrize("method,opts", CASES, ids=IDS)
def test_weight_distance_of_a_group_of_same_shaped_layers(method, opts):
    """weight_distance measures same-shaped layers of a method in one batched call: each layer's number
    must still be its own ‖W_eff − W0‖_F (dense), not a neighbour's."""
    torch.manual_seed(7)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)], nn.Linear(8, 4))
    pretrained = copy.deepcopy(model)
    opts = {k: (4 if k == "dyndora_initial_rank" else v) for k, v in opts.items()}   # the 4-wide layer allows 4
    names = inject(model, AdapterConfig(method=method, rank=2, target_modules=["0", "1", "2", "3"], **opts))
    perturb(model)
    dist = lowrank.weight_distance(model)
    for n in names:
        layer = model.get_submodule(n)
        dense = (layer.weight + layer.delta_weight() - pretrained.get_submodule(n).weight).norm().item()
        assert dist[n] == pytest.approx(dense, rel=1e-4, abs=1e-6), n
    assert len({round(dist[n], 6) for n in names[:3]}) == 3      # three different layers, three numbers


def test_delora_distance_follows_a_loaded_frozen_copy():
    """DeLoRA's weight_distance keeps the frozen copy's terms between calls; loading another adapter (another
    frozen copy, written in place) must be seen, and each layer's number stay its own dense ‖W_eff − W0‖_F."""
    def build(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)])
        names = inject(model, AdapterConfig(method="delora", rank=2, target_modules=["0", "1", "2"]))
        perturb(model)
        return model, names

    model, names = build(3)
    other, _ = build(4)                                         # another seed: another frozen copy
    pretrained = {n: model.get_submodule(n).weight.detach().clone() for n in names}

    def dense():
        return {n: (model.get_submodule(n).delta_weight()).norm().item() for n in names}

    first = lowrank.weight_distance(model)
    assert first == pytest.approx(dense(), rel=1e-6)
    for n in names:                                             # another run's adapter into the same base
        model.get_submodule(n).load_adapter_state(other.get_submodule(n).adapter_state())
    second = lowrank.weight_distance(model)
    assert second == pytest.approx(dense(), rel=1e-6) and second != pytest.approx(first, rel=1e-3)
    assert all(torch.equal(model.get_submodule(n).weight, pretrained[n]) for n in names)
