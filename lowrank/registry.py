"""Method name -> AdapterLayer subclass: one line per method."""
from .methods.delora import DeloraLayer
from .methods.delta_lora import DeltaLoraLayer
from .methods.dora import DoraLayer
from .methods.dynamic_rank import DynDoraLayer
from .methods.ether import EtherLayer, EtherPlusLayer
from .methods.lora import LoraLayer

METHODS = {
    "lora": LoraLayer,
    "dora": DoraLayer,
    "delora": DeloraLayer,
    "ether": EtherLayer,
    "etherplus": EtherPlusLayer,
    "deltalora": DeltaLoraLayer,
    "dyndora": DynDoraLayer,
}
