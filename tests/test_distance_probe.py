"""The trainers' weight-distance probe (training.common.tracking.DistanceProbe) and lowrank.layer_distances:
the --distance_logging_steps schedule, and the followed layer's per-step number equal, bit for bit, to the
number the full sweep logs for it."""
import pytest
import torch
from torch import nn

import lowrank
from lowrank import AdapterConfig
from training.common.tracking import DistanceProbe, fill_followed_layer

# method -> options: every registered method (plus DeLoRA's subtract init, whose distance is a difference)
METHOD_CASES = [(m, {}) for m in sorted(lowrank.METHODS)] + [("delora", {"delora_init": "subtract"})]


class Block(nn.Module):
    """Names as in a diffusers transformer block: attn1 (self-attention), attn2, each with to_q ... to_out.0."""

    def __init__(self, width: int):
        super().__init__()
        for attn in ("attn1", "attn2"):
            m = nn.Module()
            m.to_q, m.to_k, m.to_v = (nn.Linear(width, width, bias=False) for _ in range(3))
            m.to_out = nn.Sequential(nn.Linear(width, width))
            setattr(self, attn, m)


class TinyUNet(nn.Module):
    """Three blocks of 16-wide attention: 24 same-shaped adapted layers, so the followed layer
    (blocks.0.attn1.to_out.0) shares a batched distance group with 23 others in a full sweep."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block(16) for _ in range(3))


def adapted(method: str, opts: dict, targets=("to_q", "to_k", "to_v", "to_out.0")) -> nn.Module:
    torch.manual_seed(0)
    model = TinyUNet()
    lowrank.inject(model, AdapterConfig(method=method, rank=2, target_modules=list(targets), **opts))
    torch.manual_seed(1)   # off the initial point (B = 0 etc.), so every layer has moved
    with torch.no_grad():
        for layer in lowrank.adapter_layers(model).values():
            for name, p in layer.named_parameters():
                if p.requires_grad and not name.startswith("base."):
                    p.add_(0.1 * torch.randn_like(p) * (p.abs().mean() + 1.0))
    return model


FOLLOWED = "blocks.0.attn1.to_out.0"


@pytest.mark.parametrize("method,opts", METHOD_CASES, ids=[m + "".join(f"-{v}" for v in o.values())
                                                           for m, o in METHOD_CASES])
def test_layer_distances_is_weight_distance_and_the_followed_layer_alone_is_the_same_bits(method, opts):
    model = adapted(method, opts)
    layers = lowrank.adapter_layers(model)
    assert len(layers) == 24
    for relative in (False, True):
        everything = lowrank.weight_distance(model, relative)
        assert lowrank.layer_distances(layers, relative) == everything
        assert list(everything) == list(layers)   # model order
        assert all(v > 0 for v in everything.values())
        # one layer measured alone: the same float as in its group of 24 (no tolerance)
        assert lowrank.layer_distances({FOLLOWED: layers[FOLLOWED]}, relative) == {FOLLOWED: everything[FOLLOWED]}
    assert lowrank.layer_distances({}) == {}

    probe = DistanceProbe(model, every=10)
    assert probe.fig3 == FOLLOWED
    followed, full = probe(3), probe(10)   # the same adapter state, measured both ways
    assert not any(k.startswith("distance/") for k in followed)
    for prefix in ("distance", "rel_distance"):
        assert followed[f"{prefix}_fig3"] == full[f"{prefix}_fig3"] == full[f"{prefix}/{FOLLOWED}"]
    # the full row: every layer, as weight_distance gives it, and the summaries over them
    dist = lowrank.weight_distance(model)
    assert {k[len("distance/"):]: v for k, v in full.items() if k.startswith("distance/")} == dist
    assert full["distance_mean"] == sum(dist.values()) / len(dist) and full["distance_max"] == max(dist.values())
    rel = {k[len("rel_distance/"):]: v for k, v in full.items() if k.startswith("rel_distance/")}
    # ‖W0‖_F kept as a float: the same float64 division as weight_distance(relative=True), correctly rounded
    assert rel == lowrank.weight_distance(model, relative=True)


def test_schedule_full_every_n_steps_at_checkpoints_and_at_the_last_step():
    model = adapted("lora", {})
    probe = DistanceProbe(model, every=4, checkpoint_every=3, last_step=10)
    full = [s for s in range(1, 11) if probe.full_at(s)]
    assert full == [3, 4, 6, 8, 9, 10]
    per_layer = {"distance_mean", "distance_max", "rel_distance_mean", "rel_distance_max"}
    for step in range(1, 11):
        row = probe(step)
        assert {"distance_fig3", "rel_distance_fig3", "time/distance"} <= set(row)
        assert row["time/distance"] > 0
        layer_keys = {k for k in row if k.startswith(("distance/", "rel_distance/"))}
        if step in full:
            assert per_layer <= set(row) and len(layer_keys) == 2 * 24
        else:
            assert not (per_layer & set(row)) and not layer_keys
    assert len([k for k in probe() if k.startswith("distance/")]) == 24   # no step: a full probe (run.json)
    # every step (the old behaviour), and no checkpoint / last step given
    every = DistanceProbe(model, every=1)
    assert all(every.full_at(s) for s in range(1, 20))
    assert [s for s in range(1, 20) if DistanceProbe(model, every=7).full_at(s)] == [7, 14]


def test_no_followed_layer_measures_nothing_per_step():
    """Targets that leave the Fig. 3 layer out (self-attention's to_q, not its to_out.0): it has not moved,
    distance_fig3 stays 0.0."""
    model = adapted("delora", {}, targets=("attn1.to_q", "attn2.to_v"))
    probe = DistanceProbe(model, every=5)
    assert probe.fig3 is None and probe.followed == {}
    row = probe(1)
    assert row["distance_fig3"] == row["rel_distance_fig3"] == 0.0
    assert not any(k.startswith("distance/") for k in row) and "distance_mean" not in row
    full = probe(5)
    assert full["distance_fig3"] == 0.0 and len([k for k in full if k.startswith("distance/")]) == 6
    assert full["distance_max"] > 0


def test_fill_followed_layer_gives_every_row_the_followed_layer():
    rows = [{"step": 1, "distance_fig3": 0.5, "rel_distance_fig3": 0.05},
            {"step": 2, "distance_fig3": 0.7, "rel_distance_fig3": 0.07, "distance/a": 0.7, "rel_distance/a": 0.07,
             "distance/b": 2.0, "distance_mean": 1.35},
            {"step": 3, "distance_fig3": 0.9, "rel_distance_fig3": 0.09}]
    filled = fill_followed_layer(rows, "a")
    assert [r["distance/a"] for r in filled] == [0.5, 0.7, 0.9]
    assert [r["rel_distance/a"] for r in filled] == [0.05, 0.07, 0.09]
    assert [("distance/b" in r) for r in filled] == [False, True, False]   # other layers: full rows only
    assert "distance/a" not in rows[0]   # the rows read are left as they are
    assert fill_followed_layer(rows, None) == rows
