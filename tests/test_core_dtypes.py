"""Every method with its base layer frozen in fp16 and bf16, as the trainers run it under mixed precision:
the base weights in half precision, the adapter parameters in fp32.

For each method in lowrank.METHODS and each dtype: the forward against the same network in fp32 (same W0
values, same adapter), merge/unmerge, a save/load round trip, and weight_distance against a dense float64
computation from the paper equations (tests/reference.py).

Tolerances, with u = eps/2 the unit roundoff of the dtype (fp16: 2^-11 ≈ 4.9e-4, bf16: 2^-8 ≈ 3.9e-3):
- forward: the half path rounds, per adapted layer, the low-rank factors (the bottleneck h and the up
  factor: u each), the layer output (u; the CPU and GPU GEMMs accumulate in fp32) and then tanh (u): about
  4u per layer. The MLP's three layers are well conditioned and tanh is 1-Lipschitz, so errors add rather
  than grow: 3·4u = 12u = 6·eps, norm-relative. (Measured: ≤ 1·eps.)
- unmerge: merge rounds W_eff once (≤ u·|W_eff| per element); an additive method subtracts ΔW in float64
  and rounds once more (≤ u·|W0|), so |W_unmerged − W0| ≤ u·(|W0| + |W_eff|) per element. Methods that
  transform W (ETHER's H·W, DoRA's k ⊙ (W + sBA)) or cannot invert it (ETHER+) keep W instead: bit-exact.
- weight_distance: computed from fp32 factors and fp32 or float64 Gram products over sums of ≤ 16 terms
  (≤ 16·u32 ≈ 1e-6 relative per entry, halved by the square root); the adapters are perturbed so that ΔW
  is not a near-cancellation of its terms, so 1e-5 relative (10x margin). W0 is exact in both, since the
  half values are exactly representable in fp32 and float64.
"""
import copy

import pytest
import torch

import lowrank
from lowrank import AdapterConfig, inject
from tests.nets import MLP
from tests.reference import REFERENCES

TARGETS = ["inp", "mid", "out"]
DTYPES = [torch.float16, torch.bfloat16]
OPTS = {"deltalora": {"deltalora_start_step": 0}}   # snapshot at init: the rank-2r path runs from the start


def build(method, dtype):
    """(half model, the same in fp32, config): identical W0 values and adapter tensors, adapter perturbed."""
    torch.manual_seed(0)
    half = MLP().to(dtype)
    full = copy.deepcopy(half).float()                   # every half value is exact in fp32
    cfg = AdapterConfig(method=method, rank=4, target_modules=TARGETS, **OPTS.get(method, {}))
    inject(half, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():   # off the initial point (B = 0, c = 0, v = u ...): every ΔW is non-trivial
        for layer in lowrank.adapter_layers(half).values():
            for name, p in layer.named_parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen) * (p.abs().mean() + 1.0))
    inject(full, cfg, state={n: layer.adapter_state() for n, layer in lowrank.adapter_layers(half).items()})
    return half, full, cfg


def inputs(dtype, tokens=6):
    return torch.randn(tokens, 12, generator=torch.Generator().manual_seed(2)).to(dtype)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


PARAMS = pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
METHODS = pytest.mark.parametrize("method", list(lowrank.METHODS))


@METHODS
@PARAMS
def test_forward_matches_fp32(method, dtype):
    half, full, _ = build(method, dtype)
    for layer in lowrank.adapter_layers(half).values():
        assert layer.weight.dtype == dtype
        assert all(p.dtype == torch.float32 for n, p in layer.named_parameters() if not n.startswith("base."))
    # 400 tokens: also ETHER+'s many-token path (a rank-4n factor path instead of reflecting activations)
    for tokens in (6, 400):
        x = inputs(dtype, tokens)
        with torch.no_grad():
            y, ref = half(x), full(x.float())
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert rel_err(y, ref) < 6 * torch.finfo(dtype).eps, tokens


@METHODS
@PARAMS
def test_merge_unmerge(method, dtype):
    half, full, _ = build(method, dtype)
    x, u = inputs(dtype), torch.finfo(dtype).eps / 2
    layers = lowrank.adapter_layers(half)
    w0 = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    with torch.no_grad():
        y, ref = half(x), full(x.float())
        lowrank.merge(half)
        merged = {n: layer.weight.detach().clone() for n, layer in layers.items()}
        assert all(m.dtype == dtype for m in merged.values())
        # the merged weights are W_eff rounded once: the forward bound above holds for them too
        assert rel_err(half(x), ref) < 6 * torch.finfo(dtype).eps
        lowrank.unmerge(half)
        for n, layer in layers.items():
            w = layer.weight
            if layer.keeps_weight_on_merge or layer.rescales_weight:
                assert torch.equal(w, w0[n]), n
            else:
                bound = u * (w0[n].double().abs() + merged[n].double().abs())
                assert ((w.double() - w0[n].double()).abs() <= bound).all(), n
        assert rel_err(half(x), y) < 6 * torch.finfo(dtype).eps


@METHODS
@PARAMS
def test_save_load_round_trip(method, dtype, tmp_path):
    half, _, _ = build(method, dtype)
    torch.manual_seed(0)
    fresh = MLP().to(dtype)                              # the same pretrained weights, no adapter
    x = inputs(dtype)
    lowrank.save_adapter(half, tmp_path)
    _, saved = lowrank.read_adapter(tmp_path)
    assert all(t.dtype in (torch.float32, torch.bool) for t in saved.values())   # adapter tensors stay fp32
    lowrank.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x), half(x))
    lowrank.merge(half)
    lowrank.merge(fresh)
    for n in TARGETS:
        assert torch.equal(fresh.get_submodule(n).weight, half.get_submodule(n).weight), n


@METHODS
@PARAMS
def test_weight_distance_matches_dense_float64(method, dtype):
    half, _, cfg = build(method, dtype)
    dist = lowrank.weight_distance(half)
    rel = lowrank.weight_distance(half, relative=True)
    for n, layer in lowrank.adapter_layers(half).items():
        W0 = layer.weight.detach().double()
        P = {k: v.detach().double() if v.is_floating_point() else v for k, v in layer.adapter_state().items()}
        dense = (REFERENCES[method](P, W0, cfg) - W0).norm().item()
        assert dense > 1e-3 * W0.norm().item()           # the adapter moved W: a real distance
        assert dist[n] == pytest.approx(dense, rel=1e-5), n
        assert rel[n] == pytest.approx(dense / W0.norm().item(), rel=1e-5), n
