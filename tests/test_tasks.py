"""The task registry and a run resolved once: each task declared once and found again from any run.json (old
spellings included), and the RunSpec every trainer's parse_args returns."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from training import dreambooth, glue, instruct, semantic_map
from training.common.spec import RunSpec
from training.common.tasks import DREAMBOOTH, GLUE, INSTRUCT, SEMANTIC_MAP, TASKS, task_named, task_of

ROOT = Path(__file__).resolve().parent.parent


def test_every_task_is_declared_once_and_its_script_exists():
    assert set(TASKS) == {"dreambooth", "semantic_map", "glue", "instruct"}
    assert all(t.script.is_file() and t.script.stem == t.name for t in TASKS.values())
    # the names as string literals appear in the registry's declarations and nowhere else in the product
    names = set(TASKS) | {t.slug for t in TASKS.values()}
    found = []
    for package in ("ground", "lowrank", "training", "eval", "app"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in names:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert sorted(found) == sorted(f"training/common/tasks.py:{n}" for n in _declaration_lines()), found


def _declaration_lines() -> list[str]:
    text = (ROOT / "training" / "common" / "tasks.py").read_text().splitlines()
    return [f"{i} {m[1]!r}" for i, line in enumerate(text, 1) for m in [re.search(r'TaskInfo\("(\w+)"', line)] if m]


@pytest.mark.parametrize("run, want", [
    ({"task": "semantic-map"}, SEMANTIC_MAP),                      # run.json before the registry
    ({"task": "semantic_map"}, SEMANTIC_MAP),
    ({"task": "dreambooth"}, DREAMBOOTH),
    ({"args": {"instance_prompt": "a photo of sks dog"}}, DREAMBOOTH),   # before run.json had a task
    ({"args": {"conditioning_image_column": "conditioning_image"}}, SEMANTIC_MAP),
    ({"args": {"task_name": "sst2", "train_file": None}}, GLUE),
    ({"args": {"mc_file": [], "train_file": None}}, INSTRUCT),
    ({"args": {}}, None),
    ({"task": "nonsense"}, None),
])
def test_a_run_json_of_any_version_finds_its_task(run, want):
    assert task_of(run) is want


def test_default_outputs_and_help_keep_their_folder_names():
    assert (DREAMBOOTH.default_output("delora"), SEMANTIC_MAP.default_output("lora"),
            GLUE.default_output("dora", "sst2"), INSTRUCT.default_output("delora")) == \
        ("outputs/dreambooth-delora", "outputs/semantic-map-lora", "outputs/glue-sst2-dora", "outputs/instruct-delora")
    assert GLUE.output_help() == "outputs/glue-<task_name>-<method>" and task_named("semantic-map") is SEMANTIC_MAP


@pytest.mark.parametrize("module, task, argv", [
    (dreambooth, DREAMBOOTH, []),
    (semantic_map, SEMANTIC_MAP, []),
    (glue, GLUE, ["--task_name", "sst2"]),
    (instruct, INSTRUCT, []),
])
def test_parse_args_returns_the_run_resolved_once(module, task, argv, monkeypatch):
    monkeypatch.delenv("LOWRANK_MAX_STEPS", raising=False)
    spec = module.parse_args([*argv, "--method", "dora"])
    assert isinstance(spec, RunSpec) and spec.task is task and spec.method == "dora"
    assert spec.output_dir == Path(task.default_output("dora", "sst2" if task is GLUE else None))
    assert spec.learning_rate == (spec.args.learning_rate or 6e-4)   # DoRA's default when the flag is unset
    given = module.parse_args([*argv, "--learning_rate", "3e-3", "--target_modules", "to_q"])
    assert given.learning_rate == 3e-3 and given.adapter.target_modules == ["to_q"]
    # values known later fill only what the user left unset
    assert given.adapter_for(target_modules=["query"], dyndora_total_steps=9).target_modules == ["to_q"]
    assert spec.adapter_for(target_modules=["query"]).target_modules == ["query"]
    one = spec.with_seed(5, spec.output_dir / "seed-5")
    assert (one.args.seed, one.output_dir, spec.args.seed) == (5, spec.output_dir / "seed-5", spec.args.seed)
