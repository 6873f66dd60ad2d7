"""The package's rooms and the direction of their dependencies, read from the source with `ast`; and
the size of its modules and functions.

Every `import` and `from ... import` of every module under evomerge/ (TYPE_CHECKING blocks and imports
inside functions included: a cycle is a cycle whenever it is resolved) is mapped to the room it comes
from and checked against `ALLOWED`. Third-party libraries with a home are checked too: Ray only in
executors/ray_pool.py, lm_eval only in evaluation/, optuna only in search/, safetensors only in the
engine (and moe/). No module is longer than MAX_MODULE_LINES and no function (def line to last line)
longer than MAX_FUNCTION_LINES: a module that outgrows it holds more than one thing, a function that
does has steps that want names. Each checker is tested on planted violations, so this file can fail.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "evomerge"
MAX_MODULE_LINES = 500  # lines of a module under evomerge/
MAX_FUNCTION_LINES = 60  # lines of a function or method, def line to last line (ast's end_lineno - lineno + 1)

# room -> the rooms it may import ("root" is evomerge/__init__.py, for __version__).
ALLOWED: dict[str, set[str]] = {
    "root": set(),
    "errors": set(),
    "yamlfile": {"errors"},
    "engine": {"root", "errors", "yamlfile"},
    "toy": {"root", "errors", "yamlfile"},
    "evaluation": {"root", "errors", "yamlfile", "engine"},
    "moe": {"root", "errors", "yamlfile", "engine"},
    "executors": {"root", "errors", "yamlfile", "engine", "evaluation", "moe"},
    "search": {"root", "errors", "yamlfile", "engine", "evaluation", "moe", "executors", "toy"},
    # the CLI's command handlers (evomerge/commands/): only cli.py imports them
    "commands": {"root", "errors", "yamlfile", "engine", "evaluation", "moe", "executors", "search", "toy"},
    "cli": {"root", "errors", "yamlfile", "engine", "evaluation", "moe", "executors", "search", "toy", "commands"},
}
# third-party top-level package -> the module paths (relative to evomerge/, as a prefix) that may import it
HOMES: dict[str, tuple[str, ...]] = {
    "ray": ("executors/ray_pool.py",),
    "lm_eval": ("evaluation/",),
    "optuna": ("search/",),
    "safetensors": ("engine/", "moe/"),
}
SKIP = ("toy/data/",)  # package data (the toy tasks' lm-eval loader), not part of the code


def room_of(rel: str) -> str:
    """The room of a module given by its path relative to evomerge/ (`engine/merge.py` -> engine)."""
    parts = rel.split("/")
    if len(parts) == 1:
        stem = parts[0].removesuffix(".py")
        return "root" if stem == "__init__" else stem
    return parts[0]


def imported_modules(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in a module's syntax tree; `from a import b` yields
    `a.b` (b may be a submodule), relative imports are resolved against `module`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")[: -node.level]
                base = ".".join([*pkg, base] if base else pkg)
            out += [(node.lineno, f"{base}.{a.name}" if base else a.name) for a in node.names]
    return out


def target_room(dotted: str) -> str | None:
    """The room an `evomerge...` import lands in, or None for a third-party module."""
    parts = dotted.split(".")
    if parts[0] != "evomerge":
        return None
    if len(parts) == 1:
        return "root"
    head = parts[1]
    if (PKG / head).is_dir() or (PKG / f"{head}.py").is_file():
        return head
    return "root"  # an attribute of the package itself (`from evomerge import __version__`)


def violations(files: dict[str, str]) -> list[str]:
    """Every broken rule in `files` ({path relative to evomerge/: source text})."""
    bad = []
    for rel, text in sorted(files.items()):
        module = module_name(rel)
        room = room_of(rel)
        for line, dotted in imported_modules(ast.parse(text, rel), module):
            where = f"evomerge/{rel}:{line} imports {dotted}"
            target = target_room(dotted)
            if target is None:
                top = dotted.split(".")[0]
                homes = HOMES.get(top)
                if homes and not rel.startswith(homes):
                    bad.append(f"{where}: {top} belongs in {', '.join(homes)} only")
                continue
            if target == room:
                continue
            if target == "cli":
                bad.append(f"{where}: nothing imports the CLI")
            elif room not in ALLOWED:
                bad.append(f"{where}: room {room!r} has no rule in ALLOWED")
            elif target not in ALLOWED[room]:
                bad.append(f"{where}: {room} may not import {target}")
    return bad


def module_name(rel: str) -> str:
    return "evomerge" if rel == "__init__.py" else \
        "evomerge." + rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")


def import_cycles(files: dict[str, str]) -> list[list[str]]:
    """Groups of modules that import each other, directly or round a loop (any import counts)."""
    names = {module_name(rel): rel for rel in files}
    graph: dict[str, set[str]] = {m: set() for m in names}
    for m, rel in names.items():
        for _, dotted in imported_modules(ast.parse(files[rel], rel), m):
            parts = dotted.split(".")
            target = next((".".join(parts[:i]) for i in range(len(parts), 0, -1)
                           if ".".join(parts[:i]) in names), None)
            if target and target != m and not m.startswith(target + "."):  # a package's own __init__ is no edge
                graph[m].add(target)
    # Tarjan's strongly connected components
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_sources() -> dict[str, str]:
    files = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        if not rel.startswith(SKIP):
            files[rel] = path.read_text(encoding="utf-8")
    return files


def long_functions(files: dict[str, str]) -> list[str]:
    """Every function or method in `files` longer than MAX_FUNCTION_LINES (nested ones included)."""
    bad = []
    for rel, text in sorted(files.items()):
        for node in ast.walk(ast.parse(text, rel)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    bad.append(f"evomerge/{rel}:{node.lineno} {node.name} has {n} lines (at most "
                               f"{MAX_FUNCTION_LINES}): split it into steps that have names")
    return bad


def long_modules(files: dict[str, str]) -> list[str]:
    """Every module in `files` longer than MAX_MODULE_LINES."""
    return [f"evomerge/{rel} has {n} lines (at most {MAX_MODULE_LINES}): split it by responsibility"
            for rel, text in sorted(files.items()) if (n := len(text.splitlines())) > MAX_MODULE_LINES]


def test_dependencies_point_one_way():
    files = package_sources()
    assert "engine/merge.py" in files and "search/loop.py" in files  # the walk found the tree
    assert violations(files) == []


def test_no_module_imports_itself_round_a_loop():
    assert import_cycles(package_sources()) == []


def test_no_function_is_longer_than_the_limit():
    assert long_functions(package_sources()) == []


def test_no_module_is_longer_than_the_limit():
    assert long_modules(package_sources()) == []


def _function(lines: int, indent: str = "") -> str:
    """A function of exactly `lines` lines (def line included)."""
    return f"{indent}def f():\n" + "".join(f"{indent}    x = {i}\n" for i in range(lines - 1))


def test_the_size_checkers_catch_planted_violations():
    at_limit = _function(MAX_FUNCTION_LINES)
    assert long_functions({"engine/merge.py": at_limit}) == []
    found = long_functions({"engine/merge.py": _function(MAX_FUNCTION_LINES + 1)})
    assert len(found) == 1 and f"f has {MAX_FUNCTION_LINES + 1} lines" in found[0], found
    method = "class C:\n" + _function(MAX_FUNCTION_LINES + 1, indent="    ")
    nested = "def outer():\n" + _function(MAX_FUNCTION_LINES + 1, indent="    ") + "    return f\n"
    found = long_functions({"search/loop.py": method, "search/run.py": nested})
    assert [f.split(" has ")[0] for f in found] == ["evomerge/search/loop.py:2 f", "evomerge/search/run.py:1 outer",
                                                    "evomerge/search/run.py:2 f"], found
    assert long_modules({"search/run.py": "x = 0\n" * MAX_MODULE_LINES}) == []
    found = long_modules({"search/run.py": "x = 0\n" * (MAX_MODULE_LINES + 1)})
    assert len(found) == 1 and f"{MAX_MODULE_LINES + 1} lines" in found[0], found


def test_the_cycle_finder_finds_the_old_merge_modelcard_loop():
    files = {
        "engine/merge.py": "def write():\n    from evomerge.engine.modelcard import render_card\n",
        "engine/modelcard.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                               "    from evomerge.engine.merge import MergePlan\n",
        "engine/sinks.py": "from evomerge.engine.merge import plan\n",
    }
    assert import_cycles(files) == [["evomerge.engine.merge", "evomerge.engine.modelcard"]]


def test_every_room_has_a_rule_and_a_docstring():
    rooms = sorted(p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert rooms and set(rooms) <= set(ALLOWED), rooms
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith(SKIP):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc and len(doc) > 40, f"evomerge/{rel} must open with a docstring saying why it exists"


@pytest.mark.parametrize("rel, text, expected", [
    ("engine/merge.py", "from evomerge.search.space import load_space\n", "engine may not import search"),
    ("engine/merge.py", "def f():\n    from evomerge.toy.family import family\n", "engine may not import toy"),
    ("engine/merge.py", "from evomerge import toy\n", "engine may not import toy"),
    ("engine/modelcard.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    from evomerge.evaluation.evaluate import EvalResult\n", "engine may not import evaluation"),
    ("evaluation/evaluate.py", "import evomerge.executors.worker\n", "evaluation may not import executors"),
    ("evaluation/evaluate.py", "from evomerge.search import loop\n", "evaluation may not import search"),
    ("executors/worker.py", "from evomerge.search.space import SearchSpace\n", "executors may not import search"),
    ("search/loop.py", "from evomerge.cli import main\n", "nothing imports the CLI"),
    ("search/run.py", "from evomerge.commands.search import run\n", "search may not import commands"),
    ("executors/local.py", "from evomerge.commands import search\n", "executors may not import commands"),
    ("engine/sinks.py", "from .. import cli\n", "nothing imports the CLI"),
    ("toy/family.py", "from evomerge.engine import merge_into\n", "toy may not import engine"),
    ("search/loop.py", "import ray\n", "ray belongs in executors/ray_pool.py only"),
    ("engine/merge.py", "from lm_eval import evaluator\n", "lm_eval belongs in evaluation/ only"),
    ("evaluation/evaluate.py", "import optuna.trial\n", "optuna belongs in search/ only"),
    ("newroom/x.py", "from evomerge.engine import plan\n", "has no rule"),
])
def test_the_checker_catches_planted_violations(rel, text, expected):
    found = violations({rel: text})
    assert len(found) == 1 and expected in found[0], found


def test_the_checker_accepts_allowed_imports():
    assert violations({
        "search/loop.py": "from evomerge.engine.merge import plan\nfrom evomerge.toy.family import family\n"
                          "import optuna\nfrom evomerge.executors import make_executor\n",
        "executors/worker.py": "from evomerge.evaluation.evaluate import LMEvalEvaluator\nimport torch\n",
        "engine/modelcard.py": "from evomerge import __version__\nfrom evomerge.errors import ConfigError\n",
        "engine/merge.py": "from .sinks import ModelSink\nimport safetensors\n",
        "cli.py": "from evomerge.commands.search import run\nfrom evomerge.search.preflight import validate_space\n",
        "commands/search.py": "from evomerge.search.run import run_search\nfrom evomerge.errors import ConfigError\n",
    }) == []


def test_import_and_help_stay_light(tmp_path):
    """`import evomerge`, the CLI's help and every room's package import none of the heavy libraries."""
    code = ("import sys, evomerge, evomerge.engine, evomerge.evaluation, evomerge.search, evomerge.executors, "
            "evomerge.toy, evomerge.commands; from evomerge import cli; cli.build_parser().format_help(); "
            "bad = [m for m in ('torch', 'transformers', 'lm_eval', 'ray', 'optuna') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
