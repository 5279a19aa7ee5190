"""lowrank: bounded and unbounded low-rank adapters in pure torch.

    cfg = AdapterConfig(method="delora", rank=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    names = inject(model, cfg)          # adapted module names; everything else frozen
    merge(model); unmerge(model)
    save_adapter(model, "out/"); load_adapter(model, "out/")
    parameter_groups(model, lr=1e-3, lambda_lr=1e-2)
    weight_distance(model)              # {module name: ‖W_eff − W0‖_F}
    layer_distances(adapter_layers(model))  # the same for a given {name: layer} dict (no model walk)
    step_hooks(model)                   # .extra_loss(), .after_optimizer_step(step)
    export(unet, "out/", format="diffusers")  # exact files: diffusers, kohya, peft; diff (full ΔW, any method)
"""
from .analysis import count_parameters, distance_summary, layer_distances, weight_distance
from .config import AdapterConfig
from .errors import AdapterError, AdapterFileError, AdapterMismatchError, ConfigError, TargetError
from .export import ExportError, export, export_peft
from .hooks import step_hooks
from .inject import adapter_layers, eject, inject
from .io import load_adapter, read_adapter, save_adapter
from .methods.dynamic_rank import live_ranks
from .ops import merge, parameter_groups, unmerge
from .registry import METHODS

__all__ = [
    "AdapterConfig", "inject", "eject", "merge", "unmerge", "save_adapter", "load_adapter", "read_adapter",
    "parameter_groups", "weight_distance", "layer_distances", "distance_summary", "count_parameters", "step_hooks",
    "adapter_layers", "export", "export_peft", "ExportError", "live_ranks", "METHODS", "AdapterError",
    "ConfigError", "TargetError", "AdapterFileError", "AdapterMismatchError",
]
