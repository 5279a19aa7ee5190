"""DeLoRA's multiplicative ablation variants (Table 1 rows V5-V7): the bound each equation gives, and how the
rows relate (V7 at λ = 2 is one-sided ETHER+; V7 is V6 with one pair). The dense references, identity at init,
merge/unmerge, distances and dtypes are in the shared method matrix (test_core_methods, test_core_dtypes)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import lowrank
from lowrank import AdapterConfig, ConfigError, inject
from tests.nets import MLP
from tests.reference import mult_highrank

MULT = ["mult_relaxed", "mult_highrank", "mult_bounded"]


def adapted(method, **opts):
    torch.manual_seed(3)
    model = MLP()
    pretrained = copy.deepcopy(model)
    names = inject(model, AdapterConfig(method=method, target_modules=["inp", "mid", "out"], **{"rank": 4, **opts}))
    return model, pretrained, names


@pytest.mark.parametrize("method", MULT)
def test_bound_holds_through_training(method):
    """‖Ĥ − I‖_F ≤ |λ| (Eq. 13-14) and ‖W_eff − W̄‖_F ≤ |λ|·σ_max(W̄), with λ trained at a high rate."""
    model, pretrained, names = adapted(method)
    opt = torch.optim.AdamW(lowrank.parameter_groups(model, lr=0.3, lambda_lr=0.3), lr=0.3)
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(4))
    target = 10 * torch.randn(6, 8, generator=torch.Generator().manual_seed(5))   # far: pushes against the bound
    ratios, lambdas = [], set()
    for _ in range(30):
        F.mse_loss(model(x), target).backward()
        opt.step()
        opt.zero_grad()
        for n in names:
            layer = model.get_submodule(n)
            w0 = pretrained.get_submodule(n).weight.detach().double()
            with torch.no_grad():
                up = torch.cat([u for u, _ in layer.terms()], dim=1).double()
                down = torch.cat([d for _, d in layer.terms()]).double()
            H_minus_I = up @ down
            lam = abs(layer.mult_lambda.item())
            lambdas.add(round(lam, 6))
            assert H_minus_I.norm().item() <= lam * (1 + 1e-6)
            dense = (layer.weight.double() + layer.delta_weight().double() - w0).norm().item()
            radius = lam * torch.linalg.matrix_norm(w0, ord=2).item()
            assert layer.bound() == pytest.approx(radius, rel=1e-6)
            assert dense <= radius * (1 + 1e-5)
            ratios.append(dense / radius)
    assert max(ratios) > 0.05 and len(lambdas) > 3   # a meaningful part of the ball, and λ learned


def test_bounded_at_lambda_two_is_one_sided_etherplus_and_v6_with_one_pair():
    torch.manual_seed(0)
    a, b = MLP(), MLP()
    b.load_state_dict(a.state_dict())
    inject(a, AdapterConfig(method="mult_bounded", target_modules=["mid"], mult_lambda=2.0))
    inject(b, AdapterConfig(method="etherplus", target_modules=["mid"], etherplus_one_sided=True))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        u, v = torch.randn(1, 16, generator=g), torch.randn(1, 16, generator=g)
        a.mid.mult_u.copy_(u), a.mid.mult_v.copy_(v)
        b.mid.ether_u.copy_(u), b.mid.ether_v.copy_(v)
    x = torch.randn(5, 12, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)
        W0 = a.mid.weight.double()
        P = {k: t.double() for k, t in a.mid.adapter_state().items()}
        torch.testing.assert_close(W0 + a.mid.delta_weight().double(), mult_highrank(P, W0, None, r=2),
                                   rtol=1e-6, atol=1e-7)


def test_config_errors_are_one_line():
    for opts, words in [({"method": "mult_highrank", "rank": 3}, "rank must be even"),
                        ({"method": "mult_relaxed", "rank": 5}, "rank must be even"),
                        ({"method": "mult_bounded", "mult_lambda": 0.0}, "nonzero")]:
        with pytest.raises(ConfigError, match=words):
            AdapterConfig(**opts)
    AdapterConfig(method="mult_bounded", rank=3)   # rank does not apply to V7: any rank is accepted
    with pytest.raises(ConfigError, match="rank/2"):   # r/2 = 10 components on an 8-wide output
        inject(MLP(), AdapterConfig(method="mult_highrank", rank=20, target_modules=["out"]))


def test_parameter_counts_follow_the_rows():
    """Per adapted (out x in) matrix: V7 2·out + 1, V6 r·out + 1, V5 2r·out + 1 (four r/2-wide factors)."""
    outs = [16, 16, 8]
    for method, per_out in [("mult_bounded", 2), ("mult_highrank", 4), ("mult_relaxed", 8)]:
        model, _, _ = adapted(method)
        trainable = lowrank.count_parameters(model)["trainable"]
        assert trainable == sum(per_out * o + 1 for o in outs), method
