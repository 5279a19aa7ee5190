"""`python -m app`: flags, defaults, serving on 127.0.0.1 and a clean stop on SIGTERM."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from app.__main__ import build_parser, cli_words, main
from training import dreambooth
from training.common.tasks import OUTPUTS_DIR

from .test_app_support import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_every_flag_has_help_and_the_defaults_are_local():
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert {"host", "port", "runs_dir"} <= set(flags)
    assert all(a.help and len(a.help) > 10 for a in flags.values())
    args = parser.parse_args([])
    assert (args.host, args.port, args.runs_dir, args.launcher) == ("127.0.0.1", 7860, OUTPUTS_DIR, "accelerate")
    # the app lists what the trainers write when given no --output_dir
    assert Path(dreambooth.parse_args([]).output_dir).parent == Path(args.runs_dir) == Path("outputs")


def test_gradio_messages_speak_the_cli_flags():
    # Gradio 6's own words (gradio/http_server.py, gradio/blocks.py), as this app would print or raise them
    busy = ("Cannot find empty port in range: 7860-7860. You can specify a different port by setting the "
            "GRADIO_SERVER_PORT environment variable or passing the `server_port` parameter to `launch()`.")
    assert cli_words(busy) == "port 7860 is in use or cannot be opened: choose another with --port"
    public = cli_words("* To create a public link, set `share=True` in `launch()`.")
    assert "--share" in public and "share=True" not in public and "launch()" not in public
    assert cli_words("Please set share=True or check your proxy") == "Please set --share or check your proxy"


def test_busy_port_is_a_one_line_error(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["--port", str(port), "--runs_dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert "--port" in err and "server_port" not in err and "launch()" not in err


def test_bad_flags_and_a_runs_dir_that_is_a_file_are_one_line_errors(tmp_path, capsys):
    assert main(["--port", "abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--port" in err[0]
    (tmp_path / "afile").write_text("x")
    assert main(["--runs_dir", str(tmp_path / "afile" / "runs"), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0]


def test_python_m_app_serves_and_stops_on_sigterm(tmp_path):
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), "--runs_dir", str(tmp_path / "runs")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)   # the pipe never fills
    reader.start()
    try:
        page, deadline = None, time.monotonic() + 90
        while page is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
            except OSError:
                time.sleep(0.3)
        assert page is not None and "gradio" in page.lower()
        assert (tmp_path / "runs").is_dir()
        while not any(b"public link" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.2)             # Gradio prints its share hint just after the server answers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    proc.stdout.close()
    out = b"".join(lines).decode()
    assert "Traceback" not in out, out
    assert "add --share" in out and "share=True" not in out, out      # Gradio's hint, in the CLI's words
