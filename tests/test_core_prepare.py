"""Batched per-forward preparation (lowrank/prepare.py): the model's forward prepares DeLoRA's factors and
ETHER+'s normalised terms for every group of same-shaped layers at once; outputs and gradients must be those
of each layer computing its own, in every situation where the prepared tensors could be stale or shared: after
an optimizer step, in another grad mode, under both kinds of activation checkpointing, with gradient
accumulation, after a copy."""
import copy
import io

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lowrank
from lowrank import prepare

TARGETS = ["inp", "a", "b", "c", "out"]
# fp32 outputs and gradients of the same maths in a different op order (batched reductions): a few ulps of
# the largest value, far below any change a stale or missing factor would make (O(1) relative)
TOL = dict(rtol=1e-5, atol=1e-6)


class Blocks(nn.Module):
    """inp -> three same-shaped 24x24 layers a, b, c (one prepared group) -> out; `ckpt` runs a and b under
    torch.utils.checkpoint (None, or use_reentrant True/False), so the group spans the checkpointed region
    and the rest of the graph."""

    def __init__(self, ckpt=None):
        super().__init__()
        self.inp, self.out = nn.Linear(12, 24), nn.Linear(24, 6)
        self.a, self.b, self.c = (nn.Linear(24, 24) for _ in range(3))
        self.ckpt = ckpt

    def middle(self, h):
        return self.b(torch.tanh(self.a(h)))

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = self.middle(h) if self.ckpt is None else checkpoint(self.middle, h, use_reentrant=self.ckpt)
        return self.out(torch.tanh(self.c(torch.tanh(h))))


def pair(ckpt=None, method="delora", **options):
    """(prepared, unprepared) copies of one adapted model, the adapter moved off its init."""
    torch.manual_seed(0)
    base = Blocks(ckpt)
    cfg = lowrank.AdapterConfig(method=method, rank=4, target_modules=TARGETS, **options)
    torch.manual_seed(1)
    lowrank.inject(base, cfg)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    plain = copy.deepcopy(base)
    prepare.uninstall(plain)
    return base, plain


def run(model, x):
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def assert_same(a, b):
    (ya, ga), (yb, gb) = a, b
    torch.testing.assert_close(ya, yb, **TOL)
    assert ga.keys() == gb.keys() and all(v.abs().sum() > 0 for v in ga.values())
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], **TOL)


CASES = [("delora", dict(delora_init=i, delora_norm=n)) for i in ("subtract", "zero_b")
         for n in ("column", "frobenius", "none")] + [("etherplus", {}), ("etherplus", dict(etherplus_one_sided=True))]


@pytest.mark.parametrize("method, options", CASES)
@pytest.mark.parametrize("tokens", [(5,), (5, 40)], ids=["few_tokens", "many_tokens"])   # ETHER+'s two paths
def test_prepared_forward_equals_per_layer(method, options, tokens):
    prepared, plain = pair(method=method, **options)
    assert [len(g) for g in prepare.preparing_groups(prepared)] == [3]   # a, b, c: one batched group; inp, out alone
    x = torch.randn(*tokens, 12, generator=torch.Generator().manual_seed(2))
    assert_same(run(prepared, x), run(plain, x))
    n_trainable = sum(p.requires_grad for p in prepared.parameters())
    assert len(run(prepared, x)[1]) == n_trainable   # every trainable tensor got its gradient
    kept = {name: layer._prepared is not None for name, layer in lowrank.adapter_layers(prepared).items()}
    assert kept == {"inp": False, "out": False, "a": True, "b": True, "c": True}
    assert all(layer._prepared is None for layer in lowrank.adapter_layers(plain).values())


@pytest.mark.parametrize("method", ["delora", "etherplus"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointing_and_accumulation(ckpt, method):
    """Recomputation in backward (both kinds) and two micro-batches before one step: same gradients."""
    reference, _ = pair(None, method)
    prepared, _ = pair(ckpt, method)
    xs = [torch.randn(5, 12, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    for model in (reference, prepared):
        for x in xs:
            model(x).square().sum().backward()      # accumulate
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    for n, p in prepared.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], **TOL)


def test_stale_factors_are_never_used():
    """After an optimizer step, or a forward in another grad mode, a layer called on its own computes afresh."""
    prepared, plain = pair()
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(5))
    prepared(torch.randn(5, 12))                    # prepares with the current parameters
    for model in (prepared, plain):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(1.5)                     # what an optimizer step does: in place
    torch.testing.assert_close(prepared.b(x), plain.b(x), **TOL)
    with torch.no_grad():
        prepared(torch.randn(5, 12))                # prepared without grad ...
    y = prepared.b(x)                               # ... used with grad: must not be taken
    y.sum().backward()
    assert prepared.b.delora_A.grad is not None and prepared.b.delora_A.grad.abs().sum() > 0


def test_copy_pickle_eject_reinject():
    prepared, _ = pair()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(6))
    y = prepared(x)                                 # leaves graph tensors on every layer
    copied = copy.deepcopy(prepared)                # deepcopy refuses non-leaf tensors: they are not copied
    torch.testing.assert_close(copied(x), y, **TOL)
    buffer = io.BytesIO()
    torch.save(prepared, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), y, **TOL)
    lowrank.eject(prepared)
    assert not prepared._forward_pre_hooks and prepare.HANDLE not in prepared.__dict__
    lowrank.inject(prepared, lowrank.AdapterConfig(method="lora", rank=2, target_modules=TARGETS))
    assert not prepared._forward_pre_hooks           # LoRA prepares nothing: no hook at all
    lowrank.eject(prepared)
    lowrank.inject(prepared, lowrank.AdapterConfig(method="delora", rank=2, target_modules=TARGETS))
    assert len(prepared._forward_pre_hooks) == 1


def test_merged_model_prepares_nothing():
    prepared, _ = pair()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(7))
    y = prepared(x)
    lowrank.merge(prepared)
    for layer in lowrank.adapter_layers(prepared).values():
        layer._prepared = None
    torch.testing.assert_close(prepared(x), y, **TOL)
    assert all(layer._prepared is None for layer in lowrank.adapter_layers(prepared).values())
