"""The repository's shape: the method in a few root files of short functions, support code in the
cocomix package (which never imports a root module), entry points in scripts/ (each answering
--help, none long), no import circle and no sys.path edits anywhere."""

import ast
import glob
import os
import subprocess
import sys

import pytest

from tests.fixtures import ENV, ROOT

ROOT_MODULES = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
SCRIPTS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "scripts", "*.py"))
    if not p.endswith("__init__.py")
)


def module_files():
    """{module name: path} of every Python file of the repository (config files excepted)."""
    out = {m: os.path.join(ROOT, m + ".py") for m in ROOT_MODULES}
    for folder in ("cocomix", "scripts", "tests"):
        for p in glob.glob(os.path.join(ROOT, folder, "*.py")):
            name = os.path.basename(p)[:-3]
            out[folder if name == "__init__" else f"{folder}.{name}"] = p
    return out


def imports(path):
    """The repository modules a file imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found & set(module_files())


def test_the_root_is_the_design_card():
    card = {"prepare", "model", "sae", "train", "sample", "test_cocomix"}
    assert card <= ROOT_MODULES and len(ROOT_MODULES) <= 9, sorted(ROOT_MODULES)
    assert {m for m in ROOT_MODULES if m.startswith("test_")} == {"test_cocomix"}


def test_import_directions_and_no_circle():
    files = module_files()
    graph = {m: imports(p) - {m} for m, p in files.items()}
    for m, deps in graph.items():
        if m.startswith("cocomix"):
            assert not deps & ROOT_MODULES, f"{m} imports root modules {deps & ROOT_MODULES}"
        if m in ROOT_MODULES and not m.startswith("test_") and m != "conftest":
            assert not {d for d in deps if d.startswith("scripts")}, f"{m} imports scripts/"
    state = {}

    # depth-first search; a module met again on the current path closes a circle
    def visit(m, path):
        state[m] = "open"
        for d in graph[m]:
            assert state.get(d) != "open", "import circle: " + " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_no_sys_path_edits():
    for m, p in module_files().items():
        tree = ast.parse(open(p).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "path":
                if isinstance(node.value, ast.Name) and node.value.id == "sys":
                    pytest.fail(f"{m} touches sys.path")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_answers_help(name):
    p = subprocess.run(
        [sys.executable, "-m", f"scripts.{name}", "--help"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0 and "usage:" in p.stdout, p.stderr[-2000:]


# the root files read top to bottom: no function or method longer than this, classes aside
MAX_FUNCTION_LINES = 80
MAX_SCRIPT_LINES = 550  # each scripts/ file does one job
MAX_BENCHMARKS_LINES = 250  # docs/benchmarks.md: the current figures, older runs in its appendix


@pytest.mark.parametrize(
    "name",
    sorted(m for m in ROOT_MODULES if not m.startswith("test_")),
)
def test_root_functions_are_short(name):
    """Every function and method of a root file, nested ones too, by ast (end_lineno - lineno + 1,
    its decorators aside)."""
    tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
    long = [
        f"{name}.py:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"over {MAX_FUNCTION_LINES} lines: {long}"


def test_scripts_and_benchmarks_stay_small():
    lines = lambda path: len(open(path, encoding="utf-8").read().splitlines())
    long = {
        os.path.basename(p): lines(p)
        for p in glob.glob(os.path.join(ROOT, "scripts", "*.py"))
        if lines(p) > MAX_SCRIPT_LINES
    }
    assert not long, f"scripts/ files over {MAX_SCRIPT_LINES} lines: {long}"
    assert lines(os.path.join(ROOT, "docs", "benchmarks.md")) <= MAX_BENCHMARKS_LINES
