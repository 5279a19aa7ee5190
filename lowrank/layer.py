"""AdapterLayer: the protocol every method implements.

An AdapterLayer wraps one frozen base layer (nn.Linear, a 1x1 nn.Conv2d treated as a linear map over
channels, or GPT-2's Conv1D, whose weight is stored transposed) with weight W0 (out x in) and bias b.
A method subclass provides:

  init_adapter()      create its parameters/buffers (names carry the method prefix: lora_A, delora_lambda...)
  adapted(x)          the efficient forward on channel-last input; never builds an out x in matrix
                      when a low-rank path exists
  delta_factors()     [(U, V), ...] with ΔW = W_eff − W_pretrained = Σ U @ V (U: out x k, V: k x in);
                      gives delta_weight(), merge and a cheap distance() through k x k Gram products

and may override delta_weight(), distance_all() / stacked_delta_factors() (the per-step distance of a
group of layers), merge()/unmerge(), extra_loss(),
after_optimizer_step(step) and the class-level after_optimizer_step_all(layers, step), and
prepare_all(layers): the per-forward work on a group's parameters (normalisations, scalings) done in batched
ops when the model's forward starts (lowrank/prepare.py), handed to each layer with keep_prepared() and
taken in adapted() with take_prepared().

A method class also carries what the rest of the project knows about it (so lowrank.METHODS is the only
list of methods): `summary` (one line for help texts and the app), `default_learning_rate` (the trainers'
default), `options` (its own AdapterConfig fields, lowrank/options.py) and `check_config(config)`, the checks
of those fields, which AdapterConfig runs once per config (never per layer). What the exports
(lowrank/export.py) need of a method is on it too, as peft keeps it on each tuner: `low_rank_exact` (else its
`export_refusal`, magnitude_factors() and dense_delta()) and peft_config() / peft_state(), its native peft form.

Nothing here imports lowrank/config.py: config builds AdapterConfig from the registry, which imports the
methods, which import this module; `config` below is an AdapterConfig.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterMismatchError, ConfigError, TargetError
from .options import Option


def add_low_rank(y: torch.Tensor, h: torch.Tensor, up: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """y + alpha·h @ upᵀ as one fused addmm (no tokens x out temporaries for the product or the scale).

    h is the r-wide bottleneck (…, r), up is (out, r). Computed in y's dtype when the dtypes differ
    (fp16/bf16 base weights with fp32 adapters), which is what autocast would do anyway.
    """
    shape = y.shape
    up = up.to(y.dtype)
    out = torch.addmm(y.reshape(-1, shape[-1]), h.reshape(-1, h.shape[-1]).to(y.dtype), up.T, alpha=alpha)
    return out.view(shape)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D` (a linear layer with its weight stored (in, out)), recognised by shape and
    name: lowrank imports torch alone, never transformers."""
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2 \
        and getattr(module, "nf", None) == w.shape[1]


class _Prepared:
    """What prepare_all left for one layer, with the grad mode and parameter stamp it holds for."""
    __slots__ = ("grad_enabled", "stamp", "values")

    def __init__(self, grad_enabled: bool, stamp: tuple, values: tuple):
        self.grad_enabled, self.stamp, self.values = grad_enabled, stamp, values


class AdapterLayer(nn.Module):
    _prepared: _Prepared | None = None
    method: ClassVar[str] = ""
    prefix: ClassVar[str] = ""          # e.g. "lora_": every trainable name starts with it
    keeps_weight_on_merge: ClassVar[bool] = False  # True where ΔW cannot be undone arithmetically
    # True where W_eff is W transformed (H·W, k ⊙ W): undoing it applies H or 1/k to the merged weight's
    # rounding error too, which in fp16/bf16 lands on an element as more than one rounding of it (H mixes the
    # errors of a column's large entries into its small ones). Such methods keep W on merge below fp32.
    rescales_weight: ClassVar[bool] = False
    summary: ClassVar[str] = ""         # one line: what the method does (help texts, the app)
    default_learning_rate: ClassVar[float] = 1e-4   # the trainers' --learning_rate when none is given
    options: ClassVar[tuple[Option, ...]] = ()      # this method's own AdapterConfig fields (`<prefix>...`)

    @classmethod
    def check_config(cls, config) -> None:
        """Raise ConfigError for values of this method's own fields that no run could use.

        AdapterConfig calls it once per config for every registered method (one call per distinct
        check_config), after the generic checks, whatever method is selected: a config is valid as a
        whole. Checks that only matter when this method runs look at `config.method`. It may fill this
        method's None defaults that depend on generic fields (e.g. dyndora_initial_rank from rank)."""

    # ----- exports (lowrank/export.py) --------------------------------------------------------------------
    # True where delta_factors() give ΔW exactly: every format holds the method as LoRA factors. False (DoRA):
    # ΔW is not low rank; the method gives magnitude_factors() and dense_delta(), and files that hold LoRA
    # factors alone refuse it with export_refusal (its {fmt} is the format's name).
    low_rank_exact: ClassVar[bool] = True
    export_refusal: ClassVar[str] = ""

    @classmethod
    def peft_config(cls, config, targets: list[str], conv: bool) -> dict | None:
        """peft's own adapter_config.json for this method trained with `config` on `targets` (conv: some are
        1x1 convs), so a peft user can keep training it; None where peft has no such method or not with these
        options or layers: the export then writes exact LoRA factors (or magnitude_factors)."""
        return None

    def peft_state(self) -> dict[str, torch.Tensor]:
        """This layer's tensors under the names peft_config's peft method gives them ('lora_A.weight' ...)."""
        raise NotImplementedError

    def magnitude_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(up, down, m) with W_eff = m ⊙ (W + up·down)/‖W + up·down‖_row (peft's DoRA layout, scale folded into
        up), for a method that is not low_rank_exact."""
        raise NotImplementedError

    def dense_delta(self) -> torch.Tensor:
        """ΔW as an (out, in) float64 matrix from the method's own tensors, for one that is not low_rank_exact."""
        raise NotImplementedError

    def __init__(self, base: nn.Module, config, init_state: dict | None = None):
        super().__init__()
        self.is_conv = self.fan_in_fan_out = False
        if isinstance(base, nn.Linear):
            out_f, in_f = base.weight.shape
        elif isinstance(base, nn.Conv2d) and base.kernel_size == (1, 1) and base.groups == 1 \
                and base.stride == (1, 1) and base.padding in ((0, 0), "valid") and base.dilation == (1, 1):
            self.is_conv = True
            out_f, in_f = base.weight.shape[:2]
        elif is_conv1d(base):
            # GPT-2's Conv1D: y = x W + b with W stored (in, out), transposed (peft's fan_in_fan_out)
            self.fan_in_fan_out = True
            in_f, out_f = base.weight.shape
        else:
            raise TargetError(f"cannot adapt {type(base).__name__}: only nn.Linear, plain 1x1 nn.Conv2d and "
                              f"GPT-2 style Conv1D are supported")
        self.base = base
        self.in_features, self.out_features = in_f, out_f
        self.config = config
        self.merged = False
        self._saved_weight: torch.Tensor | None = None   # W before merge, for keeps_weight_on_merge methods
        for p in base.parameters():
            p.requires_grad_(False)
        self.check_rank(config.rank)
        # ‖W_pretrained‖_F, for relative distances (taken before any method touches the weight)
        self.register_buffer("w0_norm", self.weight.detach().float().norm(), persistent=False)
        self.init_adapter()
        if init_state is not None:
            self.load_adapter_state(init_state)
        self.post_init()

    # ----- helpers shared by the methods ------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """W as an (out, in) view of the base weight (shares storage: in-place edits hit the base)."""
        w = self.base.weight
        if self.fan_in_fan_out:
            return w.T
        return w.view(self.out_features, self.in_features) if self.is_conv else w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def base_linear(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias if bias else None)

    def check_rank(self, rank: int) -> None:
        if rank > min(self.in_features, self.out_features):
            raise ConfigError(f"rank {rank} exceeds min(in, out) = {min(self.in_features, self.out_features)} "
                              f"of a {self.out_features}x{self.in_features} layer; choose rank <= that")

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Everything a saved adapter needs: parameters and persistent buffers with the method prefix."""
        state = self.state_dict(keep_vars=False)
        return {k: v for k, v in state.items() if not k.startswith("base.")}

    def check_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Raise AdapterMismatchError unless `state` has exactly this layer's tensor names and shapes."""
        own = self.adapter_state()
        if set(own) != set(state):
            raise AdapterMismatchError(f"saved tensors {sorted(state)} do not match this {self.method} layer's "
                                       f"{sorted(own)}; the adapter was made with another method or options")
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise AdapterMismatchError(f"{k}: saved shape {tuple(v.shape)} != layer shape {tuple(own[k].shape)}; "
                                           f"the adapter was made for another model or rank")

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self.check_adapter_state(state)
        own = self.adapter_state()
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)

    # ----- protocol: methods implement these ------------------------------------------------------
    def init_adapter(self) -> None:
        raise NotImplementedError

    def post_init(self) -> None:
        """Called once the adapter tensors hold their final initial values (random or loaded)."""

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW with W_eff = W_pretrained + ΔW (for tests and analysis; forward never calls it)."""
        return sum(u @ v for u, v in self.delta_factors())

    def distance(self) -> torch.Tensor:
        """‖W_eff − W_pretrained‖_F as a 0-dim tensor, from Gram products (no out x in matrix)."""
        return type(self).distance_all([self])[0].sqrt()

    @classmethod
    def distance_all(cls, layers: list["AdapterLayer"]) -> torch.Tensor:
        """(L,) squared distances ‖W_eff − W_pretrained‖²_F of same-shaped layers of this method, in float64.

        What weight_distance calls every training step, so it works on the whole group at once: one
        batched Gram product over stacked factors (stacked_delta_factors) instead of a dozen small ops
        per layer. Grams are float64 where ΔW is a difference of terms: the subtract-style updates (DeLoRA
        Eq. 9, Delta-LoRA) cancel, and fp32 would leave a noise floor of ~3e-4·‖term‖ after the sqrt."""
        factors = cls.stacked_delta_factors(layers)
        if len(factors) == 1:   # one product: no cancellation between terms, fp32 Grams suffice
            U, V = factors[0]
        else:                   # a difference of nearly equal terms (Eq. 9 style): float64
            U = torch.cat([u.double() for u, _ in factors], dim=2)
            V = torch.cat([v.double() for _, v in factors], dim=1)
        return ((U.mT @ U) * (V @ V.mT)).sum(dim=(1, 2)).double().clamp_min(0)

    @classmethod
    def stacked_delta_factors(cls, layers: list["AdapterLayer"]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """delta_factors() of every layer stacked: [(U (L, out, k), V (L, k, in)), ...]. Methods override
        it with the same maths on stacked parameters where that saves per-layer work."""
        per = [layer.delta_factors() for layer in layers]
        return [(torch.stack([f[i][0] for f in per]), torch.stack([f[i][1] for f in per])) for i in range(len(per[0]))]

    def distance_group(self) -> tuple:
        """Layers with equal keys can share one distance_all call (same method, shapes and options)."""
        return type(self), self.out_features, self.in_features, id(self.config)

    # ----- per-forward preparation (optional; lowrank/prepare.py calls prepare_all) ----------------------------
    @classmethod
    def prepare_all(cls, layers: list["AdapterLayer"]) -> None:
        """Compute, in batched ops over a group (same method, shapes, options, device), what every layer's
        adapted() would otherwise compute from its parameters alone, and keep_prepared() it on each layer.
        Called once per forward of the model the adapters were injected into. Default: nothing to prepare."""

    def keep_prepared(self, *values) -> None:
        """Keep what prepare_all computed for this layer (tensors, or tuples of them) for take_prepared."""
        self._prepared = _Prepared(torch.is_grad_enabled(), self._parameter_stamp(), values)

    def take_prepared(self) -> tuple | None:
        """The tensors prepare_all kept for this layer, or None when they no longer hold: a parameter changed
        (optimizer step, load, move) or the grad mode differs. A mismatch drops them, so a reentrant checkpoint
        (its first pass without grad) recomputes the layer on its own and never backpropagates twice through
        the group's shared graph."""
        kept = self._prepared
        if kept is None:
            return None
        if kept.grad_enabled == torch.is_grad_enabled() and kept.stamp == self._parameter_stamp():
            return kept.values
        self._prepared = None
        return None

    def _parameter_stamp(self) -> tuple:
        return tuple((p._version, p.data_ptr()) for p in self._parameters.values() if p is not None)

    def __getstate__(self):
        state = super().__getstate__()
        state["_prepared"] = None   # graph tensors: never copied or pickled (deepcopy refuses non-leaves)
        return state

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def after_optimizer_step(self, step: int) -> None:
        pass

    def constrain_average(self) -> None:
        """Put an averaged adapter (an EMA of the tensors, swapped in) back inside the method's own constraints,
        in place; default: none. Dynamic-rank DoRA zeroes its pruned components, which an average only decays."""

    @classmethod
    def extra_loss_all(cls, layers: list["AdapterLayer"]) -> torch.Tensor | None:
        """Model-wide regulariser of this method; default: the sum of the layers' extra_loss()."""
        terms = [t for t in (layer.extra_loss() for layer in layers) if t is not None]
        return torch.stack(terms).sum() if terms else None

    @classmethod
    def after_optimizer_step_all(cls, layers: list["AdapterLayer"], step: int) -> None:
        """Model-wide hook (e.g. global rank budgets); default: each layer on its own."""
        for layer in layers:
            layer.after_optimizer_step(step)

    # ----- forward / merge ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:   # plain base weights: call its forward directly (no second module dispatch)
            return self.base.forward(x)
        if self.is_conv:  # 1x1 conv == linear over channels: run the method on channel-last input
            return self.adapted(x.movedim(1, -1)).movedim(-1, 1)
        return self.adapted(x)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = self.weight
        if self.keeps_weight_on_merge or (self.rescales_weight and w.element_size() < 4):
            self._saved_weight = w.detach().clone()
        new = w.double() + self.merge_delta().double()
        w.copy_(new.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.weight
        if self._saved_weight is not None:
            w.copy_(self._saved_weight)
            self._saved_weight = None
        else:
            w.copy_(self.unmerged_weight(w).to(w.dtype))
        self.merged = False

    def merge_delta(self) -> torch.Tensor:
        """What merge() adds to the current base weight: ΔW, unless a method keeps part of its update in
        the base weight itself."""
        return self.delta_weight()

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """Recover W from W + ΔW (additive methods; ΔW does not depend on W)."""
        return merged.double() - self.merge_delta().double()

    def release(self) -> None:
        """Undo everything this layer did to the base weight (eject without merging)."""
        self.unmerge()

    def extra_repr(self) -> str:
        return f"method={self.method}, in={self.in_features}, out={self.out_features}, merged={self.merged}"


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """{module name: AdapterLayer} in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}
