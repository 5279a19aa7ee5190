"""Option: one field of AdapterConfig, declared by the method that owns it (as peft's per-method configs).

A method file lists its options on its class (`options = (Option(...), ...)`) and checks their values in
its `check_config`; lowrank/config.py collects them from the registry into the one flat AdapterConfig, so
a trainer exposes every option as a --flag without knowing which method will run. This module imports
nothing from the package: methods, the layer protocol and config all import it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# the annotation kinds AdapterConfig checks values against (config.AdapterConfig._check_types)
KINDS = ("str", "int", "float", "bool", "None")


@dataclass(frozen=True)
class Option:
    """name: the field (prefixed with the method name: `delora_lambda`); type: its annotation as written
    in a dataclass, e.g. "float" or "int | None"; default: its value when unset; help: one sentence for
    --help and the docs."""

    name: str
    type: str
    default: Any
    help: str

    def __post_init__(self) -> None:
        kinds = [k.strip() for k in self.type.split("|")]
        if not all(k in KINDS for k in kinds):
            raise TypeError(f"option {self.name}: type {self.type!r} must be {' | '.join(KINDS)} alternatives")
        if not self.help:
            raise TypeError(f"option {self.name}: every option needs a help string")

    def field(self) -> tuple[str, str, dataclasses.Field]:
        """(name, annotation, dataclasses.field) for dataclasses.make_dataclass."""
        return self.name, self.type, dataclasses.field(default=self.default, metadata={"help": self.help})
