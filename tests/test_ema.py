"""training.common.ema.AdapterEMA: the average against a hand computation, the start step, exact swaps,
checkpointable state and a loadable adapter folder."""
import copy

import pytest
import torch
import torch.nn.functional as F

from lowrank import AdapterConfig, inject, load_adapter
from lowrank.hooks import step_hooks
from lowrank.io import adapter_state_dict
from lowrank.methods.dynamic_rank import live_ranks
from tests.nets import MLP
from training.common.ema import AdapterEMA

TARGETS = ["inp", "mid", "out"]


def setup(method="lora", **opts):
    torch.manual_seed(7)
    base = MLP()
    model = copy.deepcopy(base)
    inject(model, AdapterConfig(method=method, rank=2, target_modules=TARGETS, **opts))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    return base, model, opt


def snapshot(model):
    return {k: v.clone() for k, v in adapter_state_dict(model).items()}   # CPU tensors alias the parameters


def train(model, opt, steps, ema=None):
    """Train `steps` steps; the adapter state after each step (index 0: before training), copied."""
    x, y = torch.randn(6, 12, generator=torch.Generator().manual_seed(1)), torch.ones(6, 8)
    states = [snapshot(model)]
    for step in range(1, steps + 1):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if ema is not None:
            ema.update(step)
        states.append(snapshot(model))
    return states


@pytest.mark.parametrize("start", [0, 2])
def test_average_matches_a_hand_computation(start):
    _, model, opt = setup()
    ema = AdapterEMA(model, decay=0.9, start_step=start)
    states = train(model, opt, 4, ema)
    trained = {k for k, v in ema.live.items() if v.requires_grad}
    assert trained and trained == {k for k in states[0] if k.endswith(("lora_A", "lora_B"))}
    for k in trained:
        want = states[start][k].float()
        for s in range(start + 1, 5):
            want = 0.9 * want + 0.1 * states[s][k].float()
        torch.testing.assert_close(ema.shadow[k], want, rtol=1e-6, atol=1e-7)
        assert not torch.equal(ema.shadow[k], states[4][k])


def test_start_step_after_the_run_keeps_the_current_weights():
    _, model, opt = setup()
    ema = AdapterEMA(model, decay=0.5, start_step=10)
    states = train(model, opt, 3, ema)
    assert all(torch.equal(ema.shadow[k], states[3][k].float()) for k in states[3])


def test_training_weights_unaffected_and_swap_restores_bits(tmp_path):
    _, plain, opt = setup()
    without = train(plain, opt, 3)[-1]
    base, model, opt = setup()
    ema = AdapterEMA(model, decay=0.8, start_step=1)
    with_ema = train(model, opt, 3, ema)[-1]
    assert all(torch.equal(without[k], with_ema[k]) for k in without)
    with ema.swapped():
        inside = snapshot(model)
    assert any(not torch.equal(inside[k], with_ema[k]) for k in inside)
    assert all(torch.equal(adapter_state_dict(model)[k], with_ema[k]) for k in with_ema)
    ema.save(tmp_path / "ema")
    assert all(torch.equal(adapter_state_dict(model)[k], with_ema[k]) for k in with_ema)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "ema")
    loaded = adapter_state_dict(fresh)
    assert all(torch.equal(loaded[k], ema.shadow[k]) for k in loaded)


def test_state_round_trip_resumes_exactly():
    _, model, opt = setup()
    ema = AdapterEMA(model, decay=0.9)
    train(model, opt, 2, ema)
    saved = ema.state_dict()
    again = AdapterEMA(model, decay=0.9)
    again.load_state_dict(saved)
    assert all(torch.equal(again.shadow[k], ema.shadow[k]) for k in saved)
    with pytest.raises(ValueError):
        again.load_state_dict({"nope": torch.zeros(1)})


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1, 1.5])
def test_decay_outside_the_open_interval_is_refused(decay):
    _, model, _ = setup()
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        AdapterEMA(model, decay=decay)


def test_modules_trained_in_full_are_averaged_too():
    torch.manual_seed(7)
    model = MLP()
    inject(model, AdapterConfig(method="lora", rank=2, target_modules=["inp", "mid"], modules_to_save=["out"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    ema = AdapterEMA(model, decay=0.7)
    states = train(model, opt, 2, ema)
    assert {"modules_to_save.out.weight", "modules_to_save.out.bias"} <= ema.trained
    for k in ("modules_to_save.out.weight", "inp.lora_B"):
        want = 0.7 * (0.7 * states[0][k] + 0.3 * states[1][k]) + 0.3 * states[2][k]
        torch.testing.assert_close(ema.shadow[k], want, rtol=1e-6, atol=1e-7)


def test_dynamic_rank_average_keeps_the_runs_allocation():
    """Dynamic-rank DoRA prunes c_i to 0; an average of c only decays a pruned one. Swapped in (saved, sampled), the
    average has the run's live components only (its copied masks), so its live rank is live_ranks'; the fp32 shadow
    and the training weights are untouched."""
    _, model, opt = setup("dyndora", dyndora_total_steps=8, dyndora_prune_interval=1)
    hooks, ema = step_hooks(model), AdapterEMA(model, decay=0.9)
    x, y = torch.randn(6, 12, generator=torch.Generator().manual_seed(1)), torch.ones(6, 8)
    for step in range(1, 9):
        (F.mse_loss(model(x), y) + hooks.extra_loss()).backward()
        opt.step()
        opt.zero_grad()
        hooks.after_optimizer_step(step)
        ema.update(step)
    ranks, layers = live_ranks(model), {n: m for n, m in model.named_modules() if hasattr(m, "dyndora_mask")}
    assert sum(ranks.values()) < sum(m.dyndora_mask.numel() for m in layers.values())   # something was pruned
    weights = {n: m.dyndora_c.detach().clone() for n, m in layers.items()}
    shadow = {n: ema.shadow[f"{n}.dyndora_c"] for n in layers}
    assert any((s[m.dyndora_mask == 0] != 0).any() for s, m in zip(shadow.values(), layers.values()))
    with ema.swapped():
        for name, layer in layers.items():
            assert torch.equal(layer.dyndora_c, shadow[name] * layer.dyndora_mask)
            assert int((layer.dyndora_c != 0).sum()) <= ranks[name]
    assert all(torch.equal(layers[n].dyndora_c, weights[n]) for n in layers)   # restored bit for bit
