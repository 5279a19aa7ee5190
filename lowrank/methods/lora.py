"""LoRA: W_eff = W + (α/r)·B A   (DeLoRA Eq. 1; DoRA Eq. 1; Delta-LoRA Eq. 3).

A (r x in) Kaiming-uniform(a=√5), B (out x r) zero, so the layer starts as the identity.
Dropout, when set, acts on the input of the low-rank branch only (as in LoRA and peft).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..layer import AdapterLayer, add_low_rank


def peft_lora_config(rank: int, alpha: float, targets: list[str], dora: bool = False) -> dict:
    """peft LoraConfig fields: what diffusers writes as lora_adapter_metadata and peft as adapter_config.json."""
    return {"r": rank, "lora_alpha": alpha, "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
            "use_dora": dora, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True}


class LoraLayer(AdapterLayer):
    method = "lora"
    prefix = "lora_"
    summary = "LoRA: W + (α/r)·BA, an unbounded low-rank additive update"
    default_learning_rate = 6e-4

    def init_adapter(self) -> None:
        r = self.config.rank
        w = self.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = self.config.scale
        self.dropout = nn.Dropout(self.config.dropout) if self.config.dropout > 0 else nn.Identity()

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """h = A·dropout(x): the r-wide bottleneck."""
        return self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        # y = (W x + b) + s·B h in one addmm; the scale s goes into the GEMM, not over tokens x out
        return add_low_rank(self.base_linear(x), self.down(x), self.lora_B, self.scale)

    def delta_factors(self):
        return [(self.lora_B * self.scale, self.lora_A)]

    @classmethod
    def peft_config(cls, config, targets, conv):
        # peft's LoRA with r and alpha as trained (Linear and 1x1 conv alike)
        alpha = config.alpha if config.alpha is not None else config.rank
        return {"peft_type": "LORA", **peft_lora_config(config.rank, alpha, targets), "lora_dropout": config.dropout}

    def peft_state(self):
        conv = (1, 1) if self.is_conv else ()   # peft's conv LoRA holds A and B as 1x1 kernels
        return {"lora_A.weight": self.lora_A.detach().reshape(*self.lora_A.shape, *conv),
                "lora_B.weight": self.lora_B.detach().reshape(*self.lora_B.shape, *conv)}
