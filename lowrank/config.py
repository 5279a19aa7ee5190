"""AdapterConfig: one dataclass for every method, a help string per field, a JSON round trip.

The generic fields (method, rank, alpha, targets, dropout, modules_to_save) are declared and checked
here. Each method declares its own fields in its file (`options`, lowrank/options.py: `delora_lambda`,
`ether_blocks`...) and checks them in its `check_config`; AdapterConfig is this module's generic fields
followed by every registered method's options, in registry order, so a trainer can expose every option
as a flag without knowing which method will run, and an adapter_config.json holds one flat object.
The list of methods (names, help text) comes from the registry alone.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .options import Option
from .registry import METHODS

SD_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def _distinct_checks() -> list[type]:
    """One method class per distinct check_config (subclasses that inherit it are checked once)."""
    seen: dict = {}
    for cls in METHODS.values():
        seen.setdefault(cls.check_config.__func__, cls)
    return list(seen.values())


def method_options() -> list[Option]:
    """Every registered method's options, in registry order, each once (ETHER+ inherits ether_blocks)."""
    seen: dict[str, Option] = {}
    for name, cls in METHODS.items():
        for option in cls.options:
            if seen.setdefault(option.name, option) is not option:
                raise TypeError(f"method {name} declares option {option.name}, which another method owns")
    return list(seen.values())


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class GenericConfig:
    """The fields every method reads; AdapterConfig (below) adds the methods' own."""

    method: str = _f("lora", "Adapter method: "
                     + "; ".join(f"{name} ({cls.summary})" for name, cls in METHODS.items()) + ".")
    rank: int = _f(8, "Rank r of the low-rank update (ignored by ether/etherplus, which are rank-1/4 by "
                      "construction).")
    alpha: float | None = _f(None, "LoRA scale numerator: the update is (alpha/r)·BA. None means alpha = rank "
                                   "(scale 1).")
    target_modules: list[str] | str = _f(
        list(SD_ATTENTION),
        "Modules to adapt. A list matches by dotted-name suffix ('to_out.0' matches '...attn1.to_out.0'); "
        "a string is a regex that must match the full module name.")
    dropout: float = _f(0.0, "Dropout on the input of the low-rank branch (lora, dora, delora, dyndora).")
    modules_to_save: list[str] = _f(
        [], "Modules trained in full and saved with the adapter (peft's modules_to_save), matched by dotted-name "
            "suffix like target_modules: e.g. a new classification head ('classifier').")

    def __post_init__(self) -> None:
        """Generic checks here; each method checks its own fields (AdapterLayer.check_config)."""
        self._check_types()
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; known methods: {', '.join(sorted(METHODS))}")
        if self.rank <= 0:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is None:
            self.alpha = float(self.rank)
        if self.alpha <= 0:
            raise ConfigError(f"alpha must be positive (the update is scaled by alpha/rank), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = [str(t) for t in self.target_modules]
            if not self.target_modules:
                raise ConfigError("target_modules is empty; name at least one module (e.g. to_q)")
        elif not isinstance(self.target_modules, str):
            raise ConfigError("target_modules must be a list of name suffixes or a regex string")
        else:
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ConfigError(f"target_modules regex {self.target_modules!r} does not compile: {e}") from None
        if not isinstance(self.modules_to_save, (list, tuple)) or \
                not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise ConfigError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.target_modules, list):
            both = sorted(set(self.modules_to_save) & set(self.target_modules))
            if both:
                raise ConfigError(f"{', '.join(both)} is both adapted (target_modules) and trained in full "
                                  f"(modules_to_save); choose one")
        for cls in _distinct_checks():
            cls.check_config(self)

    def _check_types(self) -> None:
        """Each field against its annotation (JSON and flags hand over strings, bools, lists...): a
        ConfigError naming the field, never a TypeError deep inside a method. Ints are accepted where
        floats are expected (and stored as floats); floats must be finite."""
        kinds = {"str": str, "int": int, "float": (int, float), "bool": bool}
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), [k.strip() for k in str(f.type).split("|")]
            if value is None and "None" in allowed or f.name in ("target_modules", "modules_to_save"):
                continue
            ok = any(k in kinds and isinstance(value, kinds[k]) and (k == "bool" or not isinstance(value, bool))
                     for k in allowed)
            if not ok:
                raise ConfigError(f"{f.name} must be {' or '.join(allowed)}, got {value!r}")
            if "float" in allowed and not isinstance(value, str):
                if not math.isfinite(value):
                    raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
                setattr(self, f.name, float(value))

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown adapter config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"adapter config is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError("adapter config JSON must be an object")
        return cls.from_dict(data)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help string (trainers turn these into --flags)."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


# The generic fields, then each method's options: fields(AdapterConfig) is the flat list of every option.
AdapterConfig = dataclasses.make_dataclass(
    "AdapterConfig", [option.field() for option in method_options()], bases=(GenericConfig,),
    namespace={"__doc__": "Every adapter option: GenericConfig's fields plus each registered method's `options`.",
               "__module__": __name__})
