"""The core on language models: modules trained in full (a classification head) saved and reloaded with the
adapter, peft parity on a BERT-like model (lora, dora, delora; same init -> same logits and gradients) with the
head as peft's modules_to_save, and GPT-2's transposed Conv1D layers."""
import copy

import pytest
import torch
import torch.nn.functional as F
from peft import DeloraConfig, LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import lowrank
from lowrank import AdapterConfig, ConfigError, TargetError, inject
from tests.test_core_methods import perturb
from tests.test_core_peft import OURS

TARGETS = ["query", "value"]


def tiny_bert(seed=0, num_labels=3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=num_labels, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def tokens(seed=1, batch=3, length=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 40, (batch, length), generator=g)


def perturb_head(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", ["lora", "delora", "etherplus"])
def test_head_saved_and_reloaded_gives_identical_predictions(method, tmp_path):
    model = tiny_bert()
    inject(model, AdapterConfig(method=method, rank=2, target_modules=TARGETS, modules_to_save=["classifier"]))
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    perturb(model)
    perturb_head(model)
    lowrank.save_adapter(model, tmp_path)
    _, state = lowrank.read_adapter(tmp_path)
    assert {"modules_to_save.classifier.weight", "modules_to_save.classifier.bias"} <= set(state)
    x = tokens()
    fresh = tiny_bert()      # same base weights, a random (other) head until the adapter is loaded
    assert not torch.equal(fresh(x).logits, model(x).logits)
    lowrank.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(x).logits, model(x).logits)
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    # into a model that already has the adapters: values copied in, the head too
    again = tiny_bert()
    inject(again, AdapterConfig(method=method, rank=2, target_modules=TARGETS, modules_to_save=["classifier"]))
    lowrank.load_adapter(again, tmp_path)
    assert torch.equal(again(x).logits, model(x).logits)


def test_head_has_its_own_optimizer_groups_and_shape_mismatch_is_refused(tmp_path):
    model = tiny_bert()
    inject(model, AdapterConfig(method="delora", rank=2, target_modules=TARGETS, modules_to_save=["classifier"]))
    groups = {g["name"]: g for g in lowrank.parameter_groups(model, lr=1e-3, lambda_lr=3e-3, weight_decay=0.01)}
    assert [p is model.classifier.weight for p in groups["full"]["params"]] == [True]
    assert groups["full"]["weight_decay"] == 0.01
    assert [p is model.classifier.bias for p in groups["full_no_decay"]["params"]] == [True]
    assert groups["full_no_decay"]["weight_decay"] == 0.0 and groups["lambda"]["lr"] == 3e-3
    lowrank.save_adapter(model, tmp_path)
    other = tiny_bert(num_labels=2)
    with pytest.raises(lowrank.AdapterMismatchError, match="number of labels"):
        lowrank.load_adapter(other, tmp_path)
    assert not lowrank.adapter_layers(other)   # nothing half-done


def test_modules_to_save_errors():
    with pytest.raises(ConfigError, match="both adapted"):
        AdapterConfig(target_modules=["query"], modules_to_save=["query"])
    with pytest.raises(ConfigError, match="modules_to_save"):
        AdapterConfig(modules_to_save="classifier")
    model = tiny_bert()
    with pytest.raises(TargetError, match="matched no module"):
        inject(model, AdapterConfig(target_modules=TARGETS, modules_to_save=["score"]))
    with pytest.raises(TargetError, match="holds the adapted layer"):
        inject(model, AdapterConfig(target_modules=TARGETS, modules_to_save=["layer.0"]))
    assert not lowrank.adapter_layers(model)
    assert AdapterConfig.from_json(AdapterConfig(modules_to_save=["classifier"]).to_json()).modules_to_save == \
        ["classifier"]


def peft_config(method):
    common = dict(target_modules=TARGETS, modules_to_save=["classifier"])
    if method == "delora":
        return DeloraConfig(r=4, delora_lambda=15.0, **common)
    return LoraConfig(r=4, lora_alpha=8, use_dora=method == "dora", **common)


@pytest.mark.parametrize("method", ["lora", "dora", "delora"])
def test_bert_parity_with_peft_logits_and_gradients(method, tmp_path):
    """Same adapter values and head -> same logits, same gradients of every adapter tensor and of the head,
    over three AdamW steps; our peft export then loads into peft (head included) with the same logits."""
    base = tiny_bert(seed=3)
    ours = copy.deepcopy(base)
    inject(ours, AdapterConfig(target_modules=TARGETS, modules_to_save=["classifier"], **OURS[method]))
    perturb(ours)
    perturb_head(ours)
    theirs = get_peft_model(copy.deepcopy(base), peft_config(method))
    peft_params = dict(theirs.named_parameters())
    ours_params = dict(ours.named_parameters())
    pairs = {}
    for name in lowrank.adapter_layers(ours):
        p = f"base_model.model.{name}."
        if method == "delora":
            pairs |= {f"{name}.delora_{t}": p + f"delora_{t}.default" for t in ("A", "B", "lambda")}
        else:
            pairs |= {f"{name}.lora_A": p + "lora_A.default.weight", f"{name}.lora_B": p + "lora_B.default.weight"}
            if method == "dora":
                pairs[f"{name}.lora_magnitude"] = p + "lora_magnitude_vector.default.weight"
    for t in ("weight", "bias"):
        pairs[f"classifier.{t}"] = f"base_model.model.classifier.modules_to_save.default.{t}"
    with torch.no_grad():
        for k, v in pairs.items():
            peft_params[v].copy_(ours_params[k].reshape(peft_params[v].shape))
    x, labels = tokens(), torch.tensor([0, 2, 1])
    opt_a = torch.optim.AdamW([ours_params[k] for k in pairs], lr=1e-2)
    opt_b = torch.optim.AdamW([peft_params[v] for v in pairs.values()], lr=1e-2)
    for step in range(3):
        la, lb = ours(x).logits, theirs(input_ids=x).logits
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        F.cross_entropy(la, labels).backward()
        F.cross_entropy(lb, labels).backward()
        for k, v in pairs.items():
            ga, gb = ours_params[k].grad, peft_params[v].grad.reshape(ours_params[k].shape)
            assert (ga - gb).norm() <= 1e-5 * gb.norm() + 1e-7, f"step {step}: gradient of {k}"
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
    lowrank.export_peft(ours, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(loaded(input_ids=x).logits, ours(x).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", sorted(lowrank.METHODS))
def test_conv1d_is_the_transposed_linear(method):
    """GPT-2's Conv1D holds W as (in, out): an adapter on it equals the same adapter on the nn.Linear with Wᵀ,
    in forward, distance and merge/unmerge (which restores the stored weight)."""
    torch.manual_seed(0)
    conv = Conv1D(6, 8)    # nf = 6 outputs, nx = 8 inputs
    lin = nn.Linear(8, 6)
    with torch.no_grad():
        conv.bias.normal_()
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    a, b = nn.Sequential(conv), nn.Sequential(lin)
    for model in (a, b):
        torch.manual_seed(1)
        inject(model, AdapterConfig(method=method, rank=2, target_modules=["0"]))
        perturb(model)
    assert lowrank.adapter_layers(a)["0"].fan_in_fan_out
    x = torch.randn(3, 8)
    # the transposed (non-contiguous) weight may change the GEMM's summation order: a few fp32 ulps of an
    # 8-term dot product (8·2⁻²⁴·Σ|terms| ≲ 1e-6 here)
    torch.testing.assert_close(a(x), b(x), rtol=1e-6, atol=1e-6)
    assert lowrank.weight_distance(a)["0"] == pytest.approx(lowrank.weight_distance(b)["0"], rel=1e-6)
    w0 = conv.weight.detach().clone()
    lowrank.merge(a)
    torch.testing.assert_close(F.linear(x, conv.weight.T, conv.bias), b(x), rtol=1e-5, atol=1e-6)
    lowrank.unmerge(a)
    torch.testing.assert_close(conv.weight, w0, rtol=0, atol=1e-6)


def test_gpt2_lora_matches_peft_fan_in_fan_out(tmp_path):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    ours = copy.deepcopy(base)
    inject(ours, AdapterConfig(method="lora", rank=4, alpha=8.0, target_modules=["c_attn"]))
    perturb(ours)
    lowrank.export_peft(ours, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert loaded.peft_config["default"].fan_in_fan_out
    x = tokens(length=9) % 50
    torch.testing.assert_close(loaded(input_ids=x).logits, ours(x).logits, rtol=1e-5, atol=1e-5)
