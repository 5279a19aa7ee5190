"""--config FILE: a trainer's flags from a YAML, TOML or JSON file, the command line overriding it; every run writes
its own beside run.json, and that file passed back reproduces the run.

    learning_rate: 1.0e-4          # one key per flag, named as the flag without its dashes
    method: delora
    target_modules: [to_q, to_v]   # a list, or the flag's own text "to_q,to_v"
    with_prior_preservation: true  # switches: true / false
    validation_prompt: [a photo of sks cat, a sks cat on a beach]

A value goes through the flag's own type and choices, exactly as on the command line (`1e-4`, which YAML reads as
text, is the number 1e-4; `rank: 2.5` is an error). The file's values are put in the namespace before parsing, so
what the command line gives wins over the file, and the file wins over defaults and presets (glue.py --preset).
A key that is not a flag of this trainer is one `error:` line naming it (with the nearest flag), exit 2.

The written file (output_dir/config.yaml, CONFIG_FILE) holds every flag of the command line as the trainer resolved
it: the run length, the output folder, the seed it picked. Not the values a trainer derives besides its flags
(GLUE's `example`): `Flags` remembers which attributes were flags.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
from pathlib import Path

import tomllib
import yaml

from ground import runfolder

from . import TrainingError

CONFIG_FILE = "config.yaml"
CONFIG_FLAG = "config"
READERS = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".json": "JSON"}


class Flags(argparse.Namespace):
    """Parsed flags that know which attributes are flags (`flag_names`; `hidden_flags`: the test hooks --help does not
    show). Slots: not in vars(), so not in run.json."""

    __slots__ = ("flag_names", "hidden_flags")


def config_path(argv: list[str]) -> str | None:
    """The last --config value on a command line (`--config F` or `--config=F`), else None."""
    found = None
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == f"--{CONFIG_FLAG}" and i + 1 < len(argv):
            found = argv[i + 1]
        elif token.startswith(f"--{CONFIG_FLAG}="):
            found = token.split("=", 1)[1]
    return found


def read_config(path: str) -> dict:
    """The file's top-level mapping (YAML, TOML or JSON by its suffix); TrainingError in one line otherwise."""
    file = Path(path).expanduser()
    kind = READERS.get(file.suffix.lower())
    if kind is None:
        raise TrainingError(f"--config {path}: give a .yaml, .yml, .toml or .json file")
    if not file.is_file():
        raise TrainingError(f"--config {path} " + ("is not a file" if file.exists() else "does not exist"))
    try:
        text = file.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if kind == "YAML" else tomllib.loads(text) if kind == "TOML" else json.loads(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TrainingError(f"--config {path} is not valid {kind}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainingError(f"--config {path}: expected one key per flag (a mapping), got a {type(data).__name__}")
    return data


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """{dest: action} of every flag a file may set (not --help, not --config itself)."""
    return {a.dest: a for a in parser._actions
            if a.dest not in (argparse.SUPPRESS, "help", CONFIG_FLAG) and a.option_strings}


def convert(parser: argparse.ArgumentParser, action: argparse.Action, value, where: str):
    """A file's value as the flag's parsed value: through its type and choices, as the command line would be."""
    if action.nargs == 0:   # a switch (store_true / store_false)
        if not isinstance(value, bool):
            raise TrainingError(f"{where}: {action.option_strings[0]} is a switch; give true or false")
        return value if isinstance(action, argparse._StoreTrueAction) else not value \
            if isinstance(action, argparse._StoreFalseAction) else (action.const if value else action.default)
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction)
    if isinstance(value, dict):
        raise TrainingError(f"{where}: a table; {action.option_strings[0]} takes a value or a list")
    if isinstance(value, list) and not many:
        if action.type in (None, str):
            raise TrainingError(f"{where}: {action.option_strings[0]} takes one value, got a list")
        value = ",".join(str(v) for v in value)   # list flags written as one text (target_modules: to_q,to_k)
    items = (value if isinstance(value, list) else [value]) if many else [value]
    try:
        parsed = []
        for item in items:
            text = ("true" if item else "false") if isinstance(item, bool) else str(item)
            one = parser._get_value(action, text)
            parser._check_value(action, one)
            parsed.append(one)
    except argparse.ArgumentError as e:
        raise TrainingError(f"{where}: {e}") from None
    return parsed if many else parsed[0]


def config_values(parser: argparse.ArgumentParser, path: str) -> dict:
    """{dest: parsed value} of a config file; None values leave the flag at its default."""
    actions = flag_actions(parser)
    values = {}
    for key, value in read_config(path).items():
        where = f"--config {path}: {key}"
        if key == CONFIG_FLAG:
            raise TrainingError(f"{where}: a config file cannot name another one; merge them into one file")
        if key not in actions:
            near = difflib.get_close_matches(str(key), list(actions), n=1)
            hint = f"; did you mean {near[0]}?" if near else "; run with --help for the flags"
            raise TrainingError(f"--config {path}: unknown key {key!r}: not a flag of {parser.prog}{hint}")
        if value is not None:
            values[key] = convert(parser, actions[key], value, where)
    return values


def parse_with_config(parser: argparse.ArgumentParser, parse, args, namespace):
    """parse_known_args with --config: the file's values in the namespace first, the command line over them."""
    if not any(a.dest == CONFIG_FLAG for a in parser._actions) or (namespace is not None and
                                                                  not isinstance(namespace, Flags)):
        return parse(args, namespace)
    argv = list(sys.argv[1:] if args is None else args)
    namespace = namespace if namespace is not None else Flags()
    path = config_path(argv)
    actions = flag_actions(parser)
    if path is not None:
        # a flag the command line gives replaces the file's value (a repeatable flag's list too, not added to it)
        given = {d for d, a in actions.items() for o in a.option_strings for t in argv if t == o or
                 t.startswith(o + "=")}
        for key, value in config_values(parser, path).items():
            if key not in given:
                setattr(namespace, key, value)
    namespace.flag_names = tuple(actions)
    namespace.hidden_flags = frozenset(k for k, a in actions.items() if a.help == argparse.SUPPRESS)
    return parse(argv, namespace)


def written_value(name: str, value):
    """A resolved flag as the file holds it (a regex target list is its text `re:...`, as the flag takes it)."""
    if name == "target_modules" and isinstance(value, str):
        return f"re:{value}"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def write_config(folder: Path, args: argparse.Namespace, script: str, **resolved) -> Path | None:
    """folder/config.yaml: every flag of `args` (the `resolved` values, e.g. the seed the run picked, replace the
    given ones; the test hooks only when set); None for a namespace that was not parsed with config support."""
    names = getattr(args, "flag_names", None)
    if names is None:
        return None
    hidden = getattr(args, "hidden_flags", frozenset())
    values = {n: written_value(n, resolved.get(n, getattr(args, n, None))) for n in names}
    values = {k: v for k, v in values.items() if not (isinstance(v, float) and math.isnan(v)) and
              not (k in hidden and not v)}
    head = (f"# The flags of this run as {script} resolved them. `--config {CONFIG_FILE}` reproduces it; flags on\n"
            f"# the command line override the file (give another --output_dir, or the run writes into this folder).\n")
    path = folder / CONFIG_FILE
    runfolder.write_text(path, head + yaml.safe_dump(values, sort_keys=False, allow_unicode=True, width=120))
    return path
