"""Parameter counts on the real SD-1.5 UNet architecture (built from its config on the meta device:
shapes are all that counting needs), against the paper's Table 3 (LoRA r=16: 3.2M, r=4: 0.8M)."""
import pytest
import torch
from diffusers import UNet2DConditionModel

import lowrank
from lowrank import AdapterConfig

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


@pytest.fixture(scope="module")
def attention_shapes():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964   # SD-1.5 UNet: 859.5M (Table 3)
    return unet


def count(method, rank, **opts):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15)
    names = lowrank.inject(unet, AdapterConfig(method=method, rank=rank, **opts))
    return len(names), lowrank.count_parameters(unet)["trainable"], unet


def test_lora_counts_match_the_paper(attention_shapes):
    n16, p16, unet = count("lora", 16)
    assert n16 == 128                      # q, k, v, out of attn1 and attn2 in 16 transformer blocks
    assert p16 == 3_188_736                # "3.2M"
    assert count("lora", 4)[1] == 797_184  # "0.8M"
    in_out = sum(m.in_features + m.out_features for m in lowrank.adapter_layers(unet).values())
    assert p16 == 16 * in_out              # r·(in + out) per matrix


def test_other_methods_counts():
    assert count("delora", 16)[1] == 3_188_736 + 128                 # + one λ per matrix
    n, p, unet = count("dora", 16)
    outs = sum(m.out_features for m in lowrank.adapter_layers(unet).values())
    assert p == 3_188_736 + outs                                     # + one magnitude per output row
    assert count("etherplus", 16)[1] == 2 * 199_296                  # u, v on both sides: "0.4M"
    assert count("ether", 16)[1] == outs == 99_840                   # one unit vector per matrix: "0.1M"
