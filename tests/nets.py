"""Tiny models the core tests adapt: plain torch modules, no lowrank inside."""
import torch
from torch import nn


class MLP(nn.Module):
    """Three linear layers (12 -> 16 -> 16 -> 8), the middle one without bias."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.mid = nn.Linear(16, 16, bias=False)
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))
