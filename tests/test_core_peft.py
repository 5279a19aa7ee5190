"""peft as the oracle: same parameter values => same outputs and gradients (lora, dora, delora),
and our peft export loads through peft's own loader."""
import copy

import pytest
import torch
import torch.nn.functional as F
from peft import DeloraConfig, LoraConfig, PeftModel, get_peft_model

import lowrank
from lowrank import AdapterConfig, inject
from tests.nets import MLP
from tests.test_core_methods import perturb

TARGETS = ["inp", "mid", "out"]


def peft_config(method, dropout=0.0):
    if method == "delora":
        return DeloraConfig(r=4, delora_lambda=15.0, target_modules=TARGETS, module_dropout=dropout)
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout, use_dora=method == "dora")


OURS = {
    "lora": dict(method="lora", rank=4, alpha=8.0),
    "dora": dict(method="dora", rank=4, alpha=8.0),
    "delora": dict(method="delora", rank=4, delora_lambda=15.0, delora_init="zero_b", delora_norm="column"),
}


def pair(method, dropout=0.0):
    torch.manual_seed(3)
    base = MLP()
    ours, theirs = copy.deepcopy(base), get_peft_model(copy.deepcopy(base), peft_config(method, dropout))
    inject(ours, AdapterConfig(target_modules=TARGETS, dropout=dropout, **OURS[method]))
    perturb(ours)
    tensors = {}  # ours name -> peft parameter
    peft_params = dict(theirs.named_parameters())
    for name, layer in lowrank.adapter_layers(ours).items():
        p = f"base_model.model.{name}."
        if method == "delora":
            tensors |= {f"{name}.delora_{t}": peft_params[p + f"delora_{t}.default"] for t in ("A", "B", "lambda")}
        else:
            tensors |= {f"{name}.lora_A": peft_params[p + "lora_A.default.weight"],
                        f"{name}.lora_B": peft_params[p + "lora_B.default.weight"]}
            if method == "dora":
                tensors[f"{name}.lora_magnitude"] = peft_params[p + "lora_magnitude_vector.default.weight"]
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for k, p in tensors.items():
            p.copy_(ours_params[k].reshape(p.shape))
    return ours, theirs, tensors


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("method", ["lora", "dora", "delora"])
def test_same_values_same_outputs_and_gradients_as_peft(method, dropout):
    """With dropout both draw one mask per layer on the branch input: the same seed, the same masks
    (for DoRA this runs its dropout path: the base output cannot be reused)."""
    ours, theirs, tensors = pair(method, dropout)
    x = torch.randn(5, 12)
    target = torch.randn(5, 8)
    ours_params = dict(ours.named_parameters())
    opt_a = torch.optim.AdamW([ours_params[k] for k in tensors], lr=1e-2)
    opt_b = torch.optim.AdamW(list(tensors.values()), lr=1e-2)
    for step in range(3):
        torch.manual_seed(100 + step)
        ya = ours(x)
        torch.manual_seed(100 + step)
        yb = theirs(x)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        F.mse_loss(ya, target).backward()
        F.mse_loss(yb, target).backward()
        for k, p in tensors.items():
            ga, gb = ours_params[k].grad, p.grad.reshape(ours_params[k].shape)
            assert (ga - gb).norm() <= 1e-5 * gb.norm() + 1e-7, f"step {step}: gradient of {k}"
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
    # merged weights agree too
    ours.eval(), theirs.eval()
    lowrank.merge(ours)
    merged = theirs.merge_and_unload()
    for name in TARGETS:
        torch.testing.assert_close(ours.get_submodule(name).weight, merged.get_submodule(name).weight,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora", "delora"])
def test_export_loads_in_peft(method, tmp_path):
    torch.manual_seed(4)
    base = MLP()
    ours = copy.deepcopy(base)
    inject(ours, AdapterConfig(target_modules=TARGETS, **OURS[method]))
    perturb(ours)
    lowrank.export_peft(ours, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = torch.randn(4, 12)
    torch.testing.assert_close(loaded(x), ours(x), rtol=1e-5, atol=1e-6)


def test_methods_peft_lacks_export_as_exact_lora(tmp_path):
    """ETHER and subtract-init DeLoRA have no peft method, but their updates are exactly low rank: they go out
    as plain peft LoRA files (scale folded, alpha = r) that peft's own loader reproduces."""
    for i, cfg in enumerate([dict(method="ether"), dict(method="delora", delora_init="subtract")]):
        torch.manual_seed(5)
        base = MLP()
        model = copy.deepcopy(base)
        inject(model, AdapterConfig(target_modules=TARGETS, rank=4, **cfg))
        perturb(model)
        lowrank.export_peft(model, tmp_path / str(i))
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / str(i))
        assert loaded.peft_config["default"].peft_type == "LORA"
        x = torch.randn(4, 12)
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
