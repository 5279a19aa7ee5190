"""The layout rules the code keeps, read from the source (no imports run): no import cycle between a
package's modules (imports inside functions included); imports point down the layers (LAYERS: ground <
lowrank < training < eval < app; inside training, common < a task's package < a trainer script); inside a
function no project import and no library import but the heavy ones the package's __init__.py lists (eval's,
training's); no function over 90 lines. PACKAGES lists the packages held to them (one more package: one more
name, and its place in LAYERS)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("ground", "lowrank", "training", "eval", "app")
PACKAGES = ("ground", "lowrank", "eval", "training", "app")
LAYERS = {"ground": 0, "lowrank": 1, "training": 2, "eval": 3, "app": 4}   # a module imports its layer or lower
MAX_FUNCTION_LINES = 90


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """The project modules an import statement loads: `from .x import y` is x.y when y is a module, else x."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = importer.split(".")[: len(importer.split(".")) - node.level + (1 if is_package else 0)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names = [f"{source}.{a.name}" if is_module(f"{source}.{a.name}") else source for a in node.names]
    return [n for n in names if n.split(".")[0] in PROJECT]


def function_bodies(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def imports(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(project modules imported at module level, [(line, module)] imported inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name, is_package = module_name(path), path.name == "__init__.py"
    inner = {id(n) for f in function_bodies(tree) for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    top, late = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found = imported(node, name, is_package)
            if id(node) in inner:
                late += [(node.lineno, m) for m in found]
            else:
                top.update(found)
    return top, late


def optional_imports(package: str) -> set[str]:
    """The documented list: the names in the package's __init__.py docstring paragraph 'Imported inside
    functions' (heavy dependencies that only some commands need); none for a package without one."""
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text())) or ""
    paragraph = next((p for p in doc.split("\n\n") if p.startswith("Imported inside functions")), "")
    head = paragraph.split(":", 1)[1].split(".")[0] if ":" in paragraph else ""
    return {name.strip() for name in head.split(",") if name.strip()}


def late_libraries(path: Path) -> list[tuple[int, str]]:
    """[(line, top-level package)] of the non-project, non-standard-library imports inside functions."""
    tree = ast.parse(path.read_text())
    found = []
    for f in function_bodies(tree):
        for node in ast.walk(f):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                tops = [(node.module or "").split(".")[0]]
            else:
                continue
            found += [(node.lineno, t) for t in tops if t not in PROJECT and t not in sys.stdlib_module_names]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself): Tarjan."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str, scripts: set[str]) -> tuple[int, int]:
    """(the package's place in LAYERS, the place inside training): training.common and training/__init__.py 0,
    a task's package (training/<task>/: images, subject, segmap, text, families, ...) 1, a trainer script
    (training/<script>.py, one of `scripts`) 2; 0 outside training."""
    parts = module.split(".")
    inner = 0
    if parts[0] == "training" and len(parts) > 1 and parts[1] != "common":
        inner = 2 if f"training.{parts[1]}" in scripts else 1
    return LAYERS[parts[0]], inner


def upward_imports(graph: dict[str, set[str]], scripts: set[str]) -> list[str]:
    """The arrows `importer -> imported` of the graph that point up: to a higher package in LAYERS, or inside
    training to a higher place (common -> a task's package, a task's package -> a trainer script)."""
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if layer(b, scripts) > layer(a, scripts))


def import_graph(late: bool = True) -> dict[str, set[str]]:
    """module -> the project modules it imports, over PACKAGES (late: imports inside functions too)."""
    graph = {}
    for package in PACKAGES:
        for name, path in modules(package).items():
            top, inner = imports(path)
            graph[name] = top | ({module for _, module in inner} if late else set())
    return graph


def test_the_layer_checker_finds_an_upward_import():
    scripts = {"training.dreambooth", "training.glue"}
    down = {"app.ui": {"eval.report", "training.common.task", "lowrank", "ground.cli"},
            "eval.subject": {"training.subject.data", "training.common.args", "ground.runfolder"},
            "training.dreambooth": {"training.glue", "training.images.samples", "training.common.loop"},
            "training.images.samples": {"training.subject.data", "training.families.sd15", "training.common"},
            "training.common.loop": {"training", "training.common.args", "lowrank.io"},
            "lowrank.io": {"ground.runfolder"}, "ground.runfolder": {"ground.cli"}}
    assert upward_imports(down, scripts) == []
    up = {"ground.cli": {"app"}, "lowrank.io": {"training.common.args"}, "training.common.export": {"training.text"},
          "training.text.glue_data": {"training.glue"}, "training.common.loop": {"eval.common"},
          "eval.report": {"app.runs", "training.dreambooth"}, "training.families.sd15": {"training.dreambooth"}}
    assert upward_imports(up, scripts) == [
        "eval.report -> app.runs", "ground.cli -> app", "lowrank.io -> training.common.args",
        "training.common.export -> training.text", "training.common.loop -> eval.common",
        "training.families.sd15 -> training.dreambooth", "training.text.glue_data -> training.glue"]


def test_imports_point_down_the_layers():
    """ground < lowrank < training < eval < app, and inside training common < a task's package < a trainer
    script: a module imports its own layer or a lower one (imports inside functions included)."""
    assert upward_imports(import_graph(), TRAINER_SCRIPTS) == []


def test_the_checker_finds_a_cycle_and_resolves_relative_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    node = ast.parse("from .methods.lora import LoraLayer\nfrom . import options").body
    assert imported(node[0], "lowrank.registry", False) == ["lowrank.methods.lora"]
    assert imported(node[1], "lowrank.config", False) == ["lowrank.options"]
    assert imported(ast.parse("from . import EvalError").body[0], "eval.common", False) == ["eval"]


def test_no_import_cycle_between_modules():
    """Imports inside functions count too: a late import hides a cycle, it does not remove it."""
    assert cycles(import_graph()) == []


def test_no_project_import_inside_a_function_and_libraries_only_from_the_documented_list():
    allowed = {package: optional_imports(package) for package in PACKAGES}
    for package in ("eval", "training"):                          # the paragraph is found and read
        assert {"diffusers", "transformers"} <= allowed[package], (package, allowed[package])
    project = [f"{path.relative_to(ROOT)}:{line} imports {module}"
               for package in PACKAGES for path in modules(package).values() for line, module in imports(path)[1]]
    assert project == []
    libraries = [f"{path.relative_to(ROOT)}:{line} imports {top}"
                 for package in PACKAGES for path in modules(package).values()
                 for line, top in late_libraries(path) if top not in allowed[package]]
    assert libraries == []


def test_no_function_over_90_lines():
    long = [f"{path.relative_to(ROOT)}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for package in PACKAGES for path in modules(package).values()
            for f in function_bodies(ast.parse(path.read_text()))
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


# the scripts that `accelerate launch` / `python -m` run: training/*.py with a __main__ block (training/exporting.py,
# export_run for the CLI and the app, is a module beside them)
TRAINER_SCRIPTS = {f"training.{p.stem}" for p in (ROOT / "training").glob("*.py")
                   if p.stem != "__init__" and 'if __name__ == "__main__":' in p.read_text()}


def test_eval_and_app_import_no_trainer_script():
    """What a runner or the app shares with a trainer lives in a module both import (training/<task>/,
    training/common/), never in the script that `accelerate launch` runs."""
    assert {"training.dreambooth", "training.glue", "training.export"} <= TRAINER_SCRIPTS
    found = [f"{path.relative_to(ROOT)} imports {module}"
             for package in ("eval", "app") for path in modules(package).values()
             for module in imports(path)[0] | {m for _, m in imports(path)[1]} if module in TRAINER_SCRIPTS]
    assert found == []
