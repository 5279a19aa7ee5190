"""save/load round trips and every kind of bad input, each a one-line error of a dedicated type."""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowrank
from lowrank import AdapterConfig, inject, load_adapter, save_adapter
from lowrank.errors import AdapterFileError, AdapterMismatchError, ConfigError, TargetError
from tests.nets import MLP
from tests.test_core_methods import CASES, IDS, ConvNet

TARGETS = ["inp", "mid", "out"]


def trained(method, opts, steps=3):
    torch.manual_seed(5)
    base = MLP()
    model = copy.deepcopy(base)
    inject(model, AdapterConfig(method=method, rank=4, target_modules=TARGETS, **opts))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    x = torch.randn(6, 12)
    for _ in range(steps):
        F.mse_loss(model(x), torch.ones(6, 8)).backward()
        opt.step()
        opt.zero_grad()
    return base, model, x


@pytest.mark.parametrize("method,opts", CASES, ids=IDS)
def test_save_then_load_into_fresh_model_is_identical(method, opts, tmp_path):
    base, model, x = trained(method, opts)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    fresh = copy.deepcopy(base)
    names = load_adapter(fresh, tmp_path)
    assert names == TARGETS
    assert torch.equal(fresh(x), model(x))          # bit for bit: the fresh model is rebuilt, not patched
    assert lowrank.weight_distance(fresh) == lowrank.weight_distance(model)
    # loading into a model that already has (other) adapters of the same method: same outputs
    other = copy.deepcopy(base)
    inject(other, AdapterConfig(method=method, rank=4, target_modules=TARGETS, **opts))
    load_adapter(other, tmp_path)
    torch.testing.assert_close(other(x), model(x), rtol=1e-5, atol=1e-6)


def test_eject_restores_the_pretrained_model():
    for method, opts in CASES:
        base, model, x = trained(method, opts)
        lowrank.eject(model)
        assert not lowrank.adapter_layers(model)
        for n in TARGETS:
            torch.testing.assert_close(model.get_submodule(n).weight, base.get_submodule(n).weight, rtol=0, atol=1e-6)


def test_eject_with_merge_keeps_the_adapted_function():
    base, model, x = trained("delora", {})
    y = model(x)
    lowrank.eject(model, merge=True)
    assert isinstance(model.inp, nn.Linear)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)


def test_saved_files_are_safetensors_and_config_json(tmp_path):
    _, model, _ = trained("dora", {})
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["method"] == "dora" and cfg["rank"] == 4 and cfg["target_modules"] == TARGETS
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter.safetensors"), "pt") as f:
        assert f.metadata()["method"] == "dora"
        assert set(f.keys()) == {f"{n}.{t}" for n in TARGETS for t in ("lora_A", "lora_B", "lora_magnitude")}


# ----- bad input -------------------------------------------------------------------------------

def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_unknown_method_lists_known_ones():
    with pytest.raises(ConfigError) as e:
        AdapterConfig(method="lorax")
    msg = one_line(e)
    assert all(m in msg for m in lowrank.METHODS)


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_must_be_positive(rank):
    with pytest.raises(ConfigError) as e:
        AdapterConfig(rank=rank)
    assert "positive" in one_line(e)


@pytest.mark.parametrize("bad,named", [
    ({"ether_blocks": "x"}, "ether_blocks"), ({"ether_blocks": True}, "ether_blocks"), ({"dropout": "0.1"}, "dropout"),
    ({"dyndora_initial_rank": "x"}, "dyndora_initial_rank"), ({"dyndora_beta": "a"}, "dyndora_beta"),
    ({"method": ["lora"]}, "method"), ({"alpha": "x"}, "alpha"), ({"alpha": 0}, "alpha"),
    ({"delora_lambda": float("nan")}, "delora_lambda"), ({"deltalora_ratio": -1.0}, "deltalora_ratio"),
    ({"deltalora_start_step": -1}, "deltalora_start_step"), ({"delora_eps": 0.0}, "delora_eps"),
    ({"rank": 2.5}, "rank"), ({"target_modules": "("}, "regex"), ({"etherplus_one_sided": 1}, "etherplus_one_sided"),
])
def test_wrong_types_and_values_are_one_line_config_errors(bad, named):
    with pytest.raises(ConfigError) as e:
        AdapterConfig(**bad)
    assert named in one_line(e)


def test_ints_are_accepted_for_floats_and_stored_as_floats():
    cfg = AdapterConfig(method="delora", alpha=8, delora_lambda=3)
    assert cfg.alpha == 8.0 and isinstance(cfg.alpha, float) and isinstance(cfg.delora_lambda, float)


def test_rank_larger_than_layer_allows():
    model = MLP()
    with pytest.raises(ConfigError) as e:
        inject(model, AdapterConfig(method="lora", rank=9, target_modules=["out"]))  # out is 16 -> 8
    assert "min(in, out) = 8" in one_line(e)
    assert not lowrank.adapter_layers(model)                 # nothing half-injected
    assert all(p.requires_grad for p in model.parameters())  # and nothing frozen


def test_targets_that_match_nothing_name_existing_modules():
    with pytest.raises(TargetError) as e:
        inject(MLP(), AdapterConfig(target_modules=["to_q"]))
    msg = one_line(e)
    assert "inp" in msg and "mid" in msg


def test_regex_targets_and_suffix_targets():
    model = nn.Sequential(MLP(), MLP())
    assert inject(copy.deepcopy(model), AdapterConfig(rank=2, target_modules=r"1\.(inp|out)")) == ["1.inp", "1.out"]
    assert inject(copy.deepcopy(model), AdapterConfig(rank=2, target_modules=["mid"])) == ["0.mid", "1.mid"]


def test_non_linear_target_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 4))
    with pytest.raises(TargetError) as e:
        inject(model, AdapterConfig(rank=2, target_modules=["0"]))
    assert "1x1" in one_line(e)


def test_injecting_twice_is_refused():
    model = MLP()
    inject(model, AdapterConfig(rank=2, target_modules=TARGETS))
    with pytest.raises(lowrank.AdapterError, match="eject"):
        inject(model, AdapterConfig(rank=2, target_modules=TARGETS))


def test_load_into_another_model_names_the_mismatch(tmp_path):
    _, model, _ = trained("lora", {})
    save_adapter(model, tmp_path)
    with pytest.raises(AdapterMismatchError) as e:       # same module names, other shapes
        wide = MLP()
        wide.mid = nn.Linear(16, 24, bias=False)
        wide.out = nn.Linear(24, 8)
        load_adapter(wide, tmp_path)
    assert "mid" in one_line(e) and "shape" in str(e.value)
    assert not lowrank.adapter_layers(wide)
    with pytest.raises(AdapterMismatchError) as e:       # other module names
        load_adapter(ConvNet(), tmp_path)
    assert "another model" in one_line(e)


@pytest.mark.parametrize("other,named", [({"method": "delora"}, "delora"), ({"alpha": 1.0}, "alpha")])
def test_load_into_adapters_of_another_method_or_options(tmp_path, other, named):
    """Another method, or the same tensors under other options (alpha...): refused, the difference named."""
    _, model, _ = trained("lora", {})
    save_adapter(model, tmp_path)
    target = MLP()
    inject(target, AdapterConfig(**{"method": "lora", "rank": 4, "target_modules": TARGETS} | other))
    with pytest.raises(AdapterMismatchError) as e:
        load_adapter(target, tmp_path)
    assert named in one_line(e)


def test_not_safetensors_is_refused_without_unpickling(tmp_path):
    _, model, _ = trained("lora", {})
    save_adapter(model, tmp_path)
    torch.save({"x": torch.ones(2)}, tmp_path / "adapter.safetensors")   # a pickle under the right name
    with pytest.raises(AdapterFileError) as e:
        load_adapter(MLP(), tmp_path)
    assert "safetensors" in one_line(e)


def test_missing_directory_and_unknown_config_keys(tmp_path):
    with pytest.raises(AdapterFileError):
        load_adapter(MLP(), tmp_path / "nope")
    _, model, _ = trained("lora", {})
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg | {"lora_rank": 4}))
    with pytest.raises(ConfigError) as e:
        load_adapter(MLP(), tmp_path)
    assert "lora_rank" in one_line(e)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError):
        load_adapter(MLP(), tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
    _, model, _ = trained("lora", {})

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("lowrank.io.save_file", boom)
    with pytest.raises(OSError):
        save_adapter(model, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []          # no half-written or temp file left
    (tmp_path / "file").write_text("x")
    monkeypatch.undo()
    with pytest.raises(AdapterFileError, match="not a directory"):
        save_adapter(model, tmp_path / "file")


def test_config_round_trip_and_help():
    cfg = AdapterConfig(method="etherplus", ether_blocks=4, etherplus_one_sided=True)
    assert AdapterConfig.from_json(cfg.to_json()) == cfg
    assert all(AdapterConfig.help().values())                 # every field documented


def test_config_written_before_per_method_options_still_loads():
    """tests/fixtures/adapter_config_delora.json was written by the flat AdapterConfig (every field in
    config.py): the same file must load to the same values now that each method declares its own fields."""
    text = (Path(__file__).parent / "fixtures" / "adapter_config_delora.json").read_text()
    cfg = AdapterConfig.from_json(text)
    assert (cfg.method, cfg.rank, cfg.alpha, cfg.target_modules) == ("delora", 4, 8.0, ["to_q", "to_v"])
    assert (cfg.delora_lambda, cfg.delora_norm, cfg.delora_init) == (3.0, "frobenius", "subtract")
    assert cfg.dyndora_initial_rank == 6 and cfg.mult_lambda == 2.0 and cfg.ether_blocks == 1
    assert json.loads(cfg.to_json()) == json.loads(text)      # the round trip writes the same object back


def test_weights_and_config_from_different_saves_are_refused(tmp_path):
    """A crash between the two renames leaves new weights beside the old config: refused on load."""
    _, model, _ = trained("lora", {})
    save_adapter(model, tmp_path)
    old_config = (tmp_path / "adapter_config.json").read_text()
    inject(fresh := MLP(), AdapterConfig(method="lora", rank=4, alpha=16.0, target_modules=["inp", "mid", "out"]))
    save_adapter(fresh, tmp_path)
    (tmp_path / "adapter_config.json").write_text(old_config)
    with pytest.raises(AdapterFileError) as e:
        load_adapter(MLP(), tmp_path)
    assert "different saves" in one_line(e)


def test_config_that_is_not_utf8_is_a_file_error(tmp_path):
    _, model, _ = trained("lora", {})
    save_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(AdapterFileError):
        load_adapter(MLP(), tmp_path)


def test_delora_initial_copy_follows_load_state_dict():
    """The subtract init's frozen −ΔW(0) factors are cached per device; torch's load_state_dict must
    refresh them (else the model keeps subtracting the other run's initial update)."""
    _, a, x = trained("delora", {})
    torch.manual_seed(9)
    b = MLP()
    inject(b, AdapterConfig(method="delora", rank=4, target_modules=TARGETS))
    b(x)                                         # builds b's cache
    b.load_state_dict(a.state_dict())
    assert torch.equal(b(x), a(x))
