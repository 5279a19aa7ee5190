"""LoRA: W_eff = W + (α/r)·B A   (DeLoRA Eq. 1; DoRA Eq. 1; Delta-LoRA Eq. 3).

A (r x in) Kaiming-uniform(a=√5), B (out x r) zero, so the layer starts as the identity.
Dropout, when set, acts on the input of the low-rank branch only (as in LoRA and peft).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..layer import AdapterLayer, add_low_rank


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
