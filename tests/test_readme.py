"""The README cannot drift: its runnable commands (the quick start's block and each section's first ```bash
block) run as written, on the embedded defaults, in a scratch folder that links the checkout (so outputs/ lands
there), with the virtual environment on PATH (the README's `source .venv/bin/activate`).

The only change to a command: the environment variable LOWRANK_MAX_STEPS=2 (README, "DreamBooth"), which every
trainer reads as its run length when no step or epoch flag is given; `make` targets also get `-o .venv/.installed`
(the environment is installed already: no reinstall from a test). A command that cannot run here is listed in
NOT_RUN with the reason, and a command that is neither run nor listed fails the test, so a new README command has
to be classified. make test runs the headline command and checks every trainer command's flags (about 30 s);
the rest is `-m slow`.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
LINKED = ["training", "eval", "app", "lowrank", "bench", "Makefile", "pyproject.toml", ".venv"]

# command prefix -> why it does not run here (reader-supplied data, the hub, hours of CPU, a server, the suite)
NOT_RUN = {
    "make test": "the test suite itself",
    "make results": "the committed 83-minute study (tests/test_results_reproduce.py -m slow)",
    "python -m eval.robustness --ablation": "41 runs, 16 minutes (tests/test_eval_robustness.py covers the study)",
    "python -m eval.robustness --task glue": "a 3-seed study of real MiniLM runs, tens of minutes",
    "python -m training.export outputs/dog-delora": "the paper-scale run (a real dog, SD-1.5)",
    "python -m eval.subject": "needs the reader's run or images and DINO/CLIP weights from the hub",
    "python -m eval.segmentation": "needs the reader's images and a segmenter from the hub",
    "python -m eval.report outputs/dog-lora": "needs the reader's runs",
    "python -m app": "a server (tests/test_app_cli.py starts it)",
    "accelerate launch training/glue.py --method delora --task_name rte": "roberta-base and GLUE from the hub",
    "accelerate launch training/glue.py --task_name mrpc --train_file": "the reader's TSV files",
    "accelerate launch training/instruct.py --model_name_or_path meta-llama": "Llama-2 from the hub",
}
HEADLINE = "accelerate launch training/dreambooth.py --method delora"
FAST = {HEADLINE}   # run in make test; every other runnable command is -m slow


def first_blocks(text: str) -> list[list[str]]:
    """The quick start's ```bash block and the first one of every other `## ` section, as lists of lines."""
    blocks = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        m = re.search(r"^```bash\n(.*?)^```", section, flags=re.M | re.S)
        if m:
            blocks.append(m.group(1).splitlines())
    return blocks


def strip_comment(line: str) -> str:
    """The line without its shell comment (a # outside quotes, at the start or after a space)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def commands(lines: list[str]) -> list[str]:
    """Shell commands: continuation lines joined, comments (and comment-only lines) dropped."""
    out, current = [], ""
    for line in lines:
        code = strip_comment(line).rstrip()
        if not code.strip():
            continue
        current = f"{current} {code.rstrip(chr(92)).strip()}".strip()
        if not code.endswith("\\"):
            out.append(current)
            current = ""
    return out


def all_commands() -> list[str]:
    return [c for block in first_blocks((ROOT / "README.md").read_text()) for c in commands(block)]


def every_bash_command() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [c for b in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S) for c in commands(b.splitlines())]


def why_not(cmd: str) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if cmd.startswith(prefix)), None)


RUNNABLE = list(dict.fromkeys(c for c in all_commands() if why_not(c) is None))   # make demo is in two blocks


def test_every_first_block_command_is_run_or_has_a_reason():
    cmds = all_commands()
    assert HEADLINE in cmds and "make demo" in cmds and "accelerate launch training/semantic_map.py --method delora" \
        in cmds, cmds
    for cmd in cmds:
        assert why_not(cmd) or cmd.startswith(("accelerate launch training/", "make demo", "python -m")), cmd
    assert set(RUNNABLE) >= FAST


@pytest.mark.parametrize("script", ["dreambooth", "semantic_map", "glue", "instruct"])
def test_every_trainer_command_in_the_readme_has_real_flags(script):
    """Every `accelerate launch training/X.py ...` of any README block parses with X's own parser."""
    import importlib

    parser = importlib.import_module(f"training.{script}").build_parser()
    found = [c for c in every_bash_command() if f"training/{script}.py" in c]
    assert found, script
    for cmd in found:
        words = shlex.split(cmd)
        argv = words[words.index(f"training/{script}.py") + 1:]
        try:
            parser.parse_args(argv)
        except Exception as e:   # our parsers raise TrainingError instead of exiting
            pytest.fail(f"README command {cmd!r}: {e}")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder that looks like the checkout (links) with its own outputs/, and the environment a reader has."""
    d = tmp_path_factory.mktemp("readme")
    for name in LINKED:
        if (ROOT / name).exists():
            (d / name).symlink_to(ROOT / name)
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               VIRTUAL_ENV=str(VENV_BIN.parent),
               LOWRANK_MAX_STEPS="2", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               LOWRANK_CACHE=str(tmp_path_factory.getbasetemp() / "lowrank-cache"))
    env.pop("ACCELERATE_USE_CPU", None)
    return d, env


def run_readme_command(cmd: str, scratch) -> subprocess.CompletedProcess:
    d, env = scratch
    words = shlex.split(cmd)
    if words[0] == "make":
        words[1:1] = ["-o", ".venv/.installed"]
    proc = subprocess.run(words, cwd=d, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"README command {cmd!r} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def check_done_line(proc, scratch):
    """The trainer's last line names only files and folders that exist."""
    done = [line for line in proc.stdout.splitlines() if line.startswith("done: ")]
    assert done, proc.stdout[-2000:]
    folder = Path(scratch[0]) / done[-1].split("Results in ", 1)[1].split("/: ", 1)[0]
    for item in done[-1].split("/: ", 1)[1].split(", "):
        name = item.split()[0].rstrip("/")
        if not name.startswith(("no", "...")) and "..." not in item:
            assert (folder / name).exists(), (item, done[-1])
    return folder, done[-1]


@pytest.mark.parametrize("cmd", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in RUNNABLE])
def test_readme_command_runs_as_written(cmd, scratch, tiny_cache):
    proc = run_readme_command(cmd, scratch)
    if "training/" in cmd or cmd.startswith("make demo"):
        folder, done = check_done_line(proc, scratch)
        assert done.startswith("done: 2 steps"), done
        if "dreambooth" in cmd or "semantic_map" in cmd or cmd.startswith("make demo"):
            # the default run length: checkpoints with samples (LOWRANK_MAX_STEPS=2 -> one every step)
            assert "checkpoint-1/ ... checkpoint-2/ (2)" in done, done
            assert (folder / "checkpoint-2" / "samples").is_dir() and (folder / "samples_grid.png").is_file()
