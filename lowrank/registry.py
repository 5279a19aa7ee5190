"""Method name -> AdapterLayer subclass: one line per method, and the only list of methods.

Everything else derives from this dict: AdapterConfig's `method` choices and help text, the config
checks (each class's check_config), the trainers' --method choices and default learning rates
(`default_learning_rate`), the app's method list and the tests' method matrix.

Adding a method = one file + one registry line:
  1. lowrank/methods/<name>.py: a subclass of lowrank.layer.AdapterLayer with `method`, `prefix`,
     `summary`, `default_learning_rate`, init_adapter(), adapted(x), delta_factors(), and, if it has
     options, `options` (lowrank.options.Option: name prefixed with the method name, type, default,
     help) and check_config(config) for their values (equation numbers in comments);
  2. one line in METHODS below. AdapterConfig and the trainers' flags pick the options up from here.
"""
from .methods.delora import DeloraLayer
from .methods.delta_lora import DeltaLoraLayer
from .methods.dora import DoraLayer
from .methods.dynamic_rank import DynDoraLayer
from .methods.ether import EtherLayer, EtherPlusLayer
from .methods.lora import LoraLayer
from .methods.multiplicative import BoundedEtherPlusLayer, HighRankLayer, RelaxedLayer

METHODS = {
    "lora": LoraLayer,
    "dora": DoraLayer,
    "delora": DeloraLayer,
    "ether": EtherLayer,
    "etherplus": EtherPlusLayer,
    "deltalora": DeltaLoraLayer,
    "dyndora": DynDoraLayer,
    "mult_relaxed": RelaxedLayer,            # DeLoRA Table 1 ablation rows V5-V7 (ETHER side)
    "mult_highrank": HighRankLayer,
    "mult_bounded": BoundedEtherPlusLayer,
}
