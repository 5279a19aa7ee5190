"""DoRA (weight-decomposed): W' = m ⊙ (W + sBA) / ‖W + sBA‖   (DoRA Eq. 5).

One magnitude per output row (peft's convention, shape (out,)); m starts at the row norms of W so
the layer starts as the identity. The row norm is computed without an out x in temporary:
    ‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s·B_i·(W Aᵀ)_i + s²·B_i (A Aᵀ) B_iᵀ
with ‖W_i‖² cached once (W is frozen). By default the norm is detached from the graph (DoRA §4.3);
dora_fixed_magnitude freezes m (DeLoRA appendix C).
"""
from __future__ import annotations

import torch
from torch import nn

from ..layer import add_low_rank
from ..options import Option
from .lora import LoraLayer


class DoraLayer(LoraLayer):
    method = "dora"
    prefix = "lora_"  # lora_A, lora_B, lora_magnitude: peft's names
    summary = "DoRA: a learned magnitude per output row times the row-normalised W + (α/r)·BA"
    default_learning_rate = 6e-4
    rescales_weight = True   # W_eff = k ⊙ (W + sBA): unmerge divides the merged rounding by k
    options = (
        Option("dora_detach_norm", "bool", True, "DoRA §4.3: treat the row norm ||W + sBA|| as a constant in "
                                                 "backward (saves memory)."),
        Option("dora_fixed_magnitude", "bool", False, "Freeze the magnitude m at ||W0|| (DeLoRA appendix C "
                                                      "ablation, 'fixed magnitude')."),
    )

    # exports: ΔW is not low rank, so DoRA goes out in peft's DoRA layout (peft and diffusers load it exactly)
    low_rank_exact = False
    export_refusal = ("DoRA cannot be written exactly as a {fmt} file: its update m ⊙ (W + sBA)/‖W + sBA‖ is not "
                      "low rank, and the dora_scale that ComfyUI/A1111 read is not DoRA's per-row magnitude; export "
                      "it as 'diff' (full ΔW per layer: ComfyUI and A1111 apply it exactly), 'diffusers' or 'peft' "
                      "(both load DoRA exactly), or as a merged pipeline (python -m training.export --format "
                      "pipeline)")

    @classmethod
    def peft_config(cls, config, targets, conv):
        # peft's conv DoRA holds its magnitude as (1, out, 1, 1): the export writes magnitude_factors instead
        return None if conv else {**super().peft_config(config, targets, conv), "use_dora": True}

    def peft_state(self):
        return {**super().peft_state(), "lora_magnitude_vector": self.lora_magnitude.detach()}

    def magnitude_factors(self):
        return self.lora_B.detach() * self.scale, self.lora_A.detach(), self.lora_magnitude.detach()

    @torch.no_grad()
    def dense_delta(self):
        # Eq. 5, m ⊙ V/‖V‖_row − W with V = W + sBA, in float64: delta_weight()'s fp32 k·V − W cancels to
        # ~1e-7·‖W‖, more than the 1e-6 of the adapter's effect that a diff file is held to
        w = self.weight.detach().double()
        v = w + self.scale * self.lora_B.detach().double() @ self.lora_A.detach().double()
        norm = v.norm(dim=1).clamp_min(1e-6)   # row_norm's floor: sqrt(1e-12)
        return (self.lora_magnitude.detach().double() / norm).unsqueeze(1) * v - w

    def init_adapter(self) -> None:
        super().init_adapter()
        w = self.weight.detach().float()
        self.register_buffer("lora_w_row_sq", (w * w).sum(dim=1), persistent=False)
        self.lora_magnitude = nn.Parameter(self.lora_w_row_sq.sqrt().clone(),
                                           requires_grad=not self.config.dora_fixed_magnitude)

    def row_norm(self) -> torch.Tensor:
        """‖W + sBA‖ per output row, (out,); detached unless dora_detach_norm=False."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.dora_detach_norm):
            A, B, s = self.lora_A, self.lora_B, self.scale
            WA = (self.weight.to(A.dtype) @ A.T)                   # (out, r): W Aᵀ
            cross = (B * WA).sum(dim=1)                             # B_i · (W Aᵀ)_i
            quad = ((B @ (A @ A.T)) * B).sum(dim=1)                 # B_i (A Aᵀ) B_iᵀ
            sq = self.lora_w_row_sq + 2 * s * cross + s * s * quad
            return sq.clamp_min(1e-12).sqrt()

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        k = self.lora_magnitude / self.row_norm()                  # (out,)
        base = self.base_linear(x, bias=False)
        if isinstance(self.dropout, nn.Identity):
            # y = k ⊙ (W x + sBA x) + b, reusing the base output: no second GEMM, two fused passes.
            z = add_low_rank(base, self.down(x), self.lora_B, self.scale)
            k = k.to(z.dtype)
            return z * k if self.bias is None else torch.addcmul(self.bias.to(z.dtype), z, k)
        # as peft: the base path sees x, the adapted path sees one dropout(x) (one extra GEMM).
        xd = self.dropout(x)
        lora = ((xd.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T) * self.scale).to(base.dtype)
        y = base + (k - 1).to(base.dtype) * self.base_linear(xd, bias=False) + k.to(base.dtype) * lora
        return y if self.bias is None else y + self.bias

    def delta_weight(self) -> torch.Tensor:
        k = (self.lora_magnitude / self.row_norm()).unsqueeze(1)
        w = self.weight.float()
        return k * (w + self.scale * self.lora_B @ self.lora_A) - w

    @classmethod
    def distance_all(cls, layers):
        """‖ΔW‖²_F of a group. ΔW_i = (k−1) W_i + k s (BA)_i is full rank, so expand row by row with the
        Gram terms of row_norm():
            ‖ΔW_i‖² = (k−1)²‖W_i‖² + 2(k−1)k s B_i·(WAᵀ)_i + k² s² B_i(AAᵀ)B_iᵀ.
        One fp32 GEMM per layer (W Aᵀ), the rest over all L layers at once, in float64; k as the forward
        has it (fp32)."""
        s = layers[0].scale
        A = torch.stack([layer.lora_A for layer in layers])                        # (L, r, in)
        B = torch.stack([layer.lora_B for layer in layers])                        # (L, out, r)
        WA = torch.stack([layer.weight.to(A.dtype) @ layer.lora_A.T for layer in layers]).double()
        w_sq = torch.stack([layer.lora_w_row_sq for layer in layers])              # (L, out)
        m = torch.stack([layer.lora_magnitude for layer in layers])
        A, B = A.double(), B.double()
        cross, quad = (B * WA).sum(2), ((B @ (A @ A.mT)) * B).sum(2)
        n = (w_sq + 2 * s * cross.float() + s * s * quad.float()).clamp_min(1e-12).sqrt()
        k = (m / n).double()
        sq = (k - 1) ** 2 * w_sq.double() + 2 * (k - 1) * k * s * cross + (k * s) ** 2 * quad
        return sq.sum(1).clamp_min(0)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._merge_k = self.lora_magnitude.detach() / self.row_norm()  # k at merge time
        super().merge()

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        # merged = k ⊙ (W + sBA)  ⇒  W = merged / k − sBA   (k cached: it cannot be recovered from merged)
        k = self._merge_k.double().unsqueeze(1)
        self._merge_k = None
        return merged.double() / k - self.scale * (self.lora_B.double() @ self.lora_A.double())
