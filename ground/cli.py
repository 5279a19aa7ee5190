"""The command-line contract every lowrank command shares (trainers, eval, the app, the benches).

Bad input is one line on stderr, `error: <what is wrong and what to do>`, and exit status 2; never
argparse's usage dump, never a traceback. Each package subclasses `ArgumentParser` with its own error
class and calls `run_cli`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable, Sequence


class CommandError(Exception):
    """Bad input to a command: printed as one `error:` line; the process exits with `exit_code`."""

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise `error_class` (one line, caught by run_cli) instead of printing usage."""

    error_class: type[Exception] = CommandError

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)   # an abbreviated flag is a typo waiting to change meaning
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise self.error_class(f"{message} (see {self.prog} --help)")


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
            errors: tuple[type[BaseException], ...] = (CommandError,), interrupted: str = "interrupted") -> int:
    """Call main(argv); an exception in `errors` becomes `error: <message>` and its `exit_code` (default 2)."""
    try:
        return main(argv) or 0
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130


def error_line(lines: Iterable[str]) -> str:
    """The line that says why a command failed, from its output: the last `error: ...` line (this contract's;
    any case), else the last line naming a Python exception (`...Error: ...`), else the last non-blank line;
    stripped and cut at 300 characters. "" when there is no output."""
    lines = [line.strip() for line in lines if line.strip()]
    errors = [line for line in lines if line.lower().startswith("error:")]
    exceptions = [line for line in lines if "Error:" in line]
    return (errors or exceptions or lines or [""])[-1][:300]


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (not the one at setup), so redirected stderr still sees it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass
