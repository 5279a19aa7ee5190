"""`python -m app` / `lowrank-app`: serve the Gradio app (four tabs: Train, Compare, Generate, Robustness).

    python -m app --runs_dir outputs --port 7860       # outputs/: where the trainers write by default
    python -m app --host 0.0.0.0 --auth_file logins.txt     # reachable from other machines: logins required

An app reachable beyond this machine (any --host but loopback, or --share) refuses to start without
--auth/--auth_file (see app/auth.py), unless --insecure_no_auth says a proxy in front authenticates users.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import signal
import sys
from pathlib import Path

from ground import cli
from training.common.args import file_in_the_way
from training.common.tasks import OUTPUTS_DIR

from .auth import AuthError, checker, exposure_error, logins_from_flags
from .robustness import RESULTS_DIR
from .service import Service
from .ui import CSS, build

# gradio reads it when the page is built (gradio.analytics), so setting it after the import is in time
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


class ArgumentParser(cli.ArgumentParser):
    """One `error:` line for a bad flag, as every other bad input; --help has the flags."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="lowrank-app", description=__doc__.splitlines()[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="Address to bind; 0.0.0.0 exposes the app (and its training button) to the network.")
    p.add_argument("--port", type=int, default=7860, help="Port to serve on.")
    p.add_argument("--runs_dir", default=OUTPUTS_DIR,
                   help="Folder holding one sub-folder per training run (the trainers' default --output_dir "
                        "parent, so CLI runs show up; a robustness study's runs under <study>/runs/ and a "
                        "--seeds run's under <group>/seed-N too); runs "
                        "found there are listed after a restart.")
    p.add_argument("--launcher", choices=["accelerate", "python"], default="accelerate",
                   help="How the trainer is started: 'accelerate launch training/dreambooth.py' (as the CLI docs) "
                        "or plain 'python training/dreambooth.py'.")
    p.add_argument("--max_image_mb", type=float, default=20.0, help="Largest accepted subject image, in MB.")
    p.add_argument("--cancel_grace", type=float, default=10.0,
                   help="Seconds a cancelled trainer gets to exit after SIGTERM before it is killed with SIGKILL.")
    p.add_argument("--eval_args", default="",
                   help="Extra flags for `python -m eval.subject` when scoring from the app, e.g. "
                        "\"--dino_model /models/dino-vits16 --clip_model /models/clip-vit-large\" (offline machines).")
    p.add_argument("--poll", type=float, default=1.0, help="Seconds between progress updates while training.")
    p.add_argument("--share", action="store_true", help="Also open a public gradio.live link (needs internet).")
    p.add_argument("--auth", action="append", metavar="USER:PASSWORD",
                   help="A login for the app (repeatable). Required with a non-loopback --host or --share.")
    p.add_argument("--auth_file", default=None,
                   help="File of logins, one a line: user:password, or user:pbkdf2_sha256:... as printed by "
                        "`python -m app.auth USER`. Required (or --auth) with a non-loopback --host or --share.")
    p.add_argument("--insecure_no_auth", action="store_true",
                   help="Serve a non-loopback --host or --share without logins (only behind a proxy that "
                        "authenticates users: anyone who reaches the app can start training on this machine).")
    return p


# Gradio speaks of launch()'s parameters; a user of this command has its flags instead
_GRADIO_WORDS = [
    (re.compile(r"Cannot find empty port in range: (\d+)-\d+\..*"),
     r"port \1 is in use or cannot be opened: choose another with --port"),
    (re.compile(r"To create a public link, set `share=True` in `launch\(\)`\."),
     "To create a public link, add --share (it needs logins: --auth or --auth_file)."),
    (re.compile(r"`?share=True`?( in `?launch\(\)`?)?"), "--share"),
    (re.compile(r"`?server_port`?( parameter)?( to `?launch\(\)`?)?"), "--port"),
]


def cli_words(text: str) -> str:
    """Gradio's message with the CLI's flags (--share, --port) in place of launch()'s parameters."""
    for pattern, repl in _GRADIO_WORDS:
        text = pattern.sub(repl, text)
    return text


class _Rephrased:
    """A stream that writes Gradio's start-up prints with the CLI's flags (each message is one write)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(cli_words(text))

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _cli_words_on_stdout():
    stream = sys.stdout
    sys.stdout = _Rephrased(stream)
    try:
        yield
    finally:
        sys.stdout = stream


def serve(args: argparse.Namespace, block: bool = True):
    """Start the app; returns (demo, service). With block=False the server runs in a thread (tests)."""
    try:   # before anything is built: a refused start leaves nothing behind
        logins = logins_from_flags(getattr(args, "auth", None), getattr(args, "auth_file", None))
    except AuthError as e:
        raise cli.CommandError(str(e)) from None
    refusal = exposure_error(args.host, args.share, bool(logins), getattr(args, "insecure_no_auth", False))
    if refusal:
        raise cli.CommandError(refusal)

    service = Service(Path(args.runs_dir), launcher=args.launcher, grace_s=args.cancel_grace,
                      max_image_mb=args.max_image_mb, eval_args=shlex.split(args.eval_args))
    demo = build(service, poll_s=args.poll)
    demo.queue(default_concurrency_limit=1)
    try:
        with _cli_words_on_stdout():
            demo.launch(server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=not block,
                    allowed_paths=[str(service.runs_dir), str(RESULTS_DIR)],
                    max_file_size=f"{int(2 * args.max_image_mb) + 1}mb",
                    show_error=False, quiet=not block, css=CSS, auth=checker(logins) if logins else None,
                        auth_message="lowrank: log in to train and compare adapters on this machine")
    except BaseException as e:
        service.close()
        if isinstance(e, (OSError, ValueError)) and cli_words(str(e)) != str(e):   # Gradio's start-up refusals
            raise cli.CommandError(cli_words(str(e))) from None
        raise
    if block:
        service.close()
    return demo, service


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    runs = Path(args.runs_dir).expanduser()
    bad = file_in_the_way(runs)
    if bad is not None:
        raise cli.CommandError(f"--runs_dir {runs}: {bad} is a file, not a folder; choose another --runs_dir")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)       # gradio's own start-up probes
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))   # SIGTERM -> finally blocks -> trainers cancelled
    try:
        serve(args, block=True)
    except KeyboardInterrupt:
        pass
    except OSError as e:          # port in use, bad host
        raise cli.CommandError(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
