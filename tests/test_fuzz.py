"""A fuzz pass: mutations of the repository's own recipes, MoE configs and spaces, fed to the CLI.

Whatever a user writes, `evomerge validate` and `evomerge merge` answer with exit 0 (it was fine) or 2
(one line naming the field), never a traceback or an internal error. Hypothesis draws mutations of the
example files' YAML trees: a key dropped or misspelt, a value's type swapped (a string where a list
belongs, a mapping for a number, null), numbers at the extremes (0, -1, 1e308, nan, 2**64), an item
duplicated, a list emptied. The CI part runs a few hundred cases; `scripts/fuzz.sh` runs the same pass
with many more (EVOMERGE_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from evomerge.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCALE = int(os.environ.get("EVOMERGE_FUZZ_EXAMPLES", "0")) or None  # the full pass: scripts/fuzz.sh
RECIPES = sorted(p for p in (ROOT / "examples").glob("toy_*.yaml") if "moe" not in p.name)
MOE = sorted((ROOT / "examples").glob("toy_moe*.yaml"))
SPACES = [ROOT / "search_spaces" / n for n in ("toy_slerp_gradient.yaml", "toy_ties.yaml", "toy_moe.yaml",
                                               "toy_method_choice.yaml")]

EXTREMES = [0, -1, 1, 2, 0.5, -0.0, 1e308, -1e308, 1e-300, math.inf, -math.inf, math.nan, 2**31, 2**64, -2**63,
            True, False, None, "", "x", "0.5", "nan", "../..", "/", "a" * 300, [], {}, [1, 2], ["a"], {"a": 1},
            {"filter": "mlp", "value": 2}, [0.1, "x"], "toy:nope"]


def _paths(node, prefix=()):
    """Every path (tuple of keys / indices) in a parsed YAML tree, the root included."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _get(node, path):
    for p in path:
        node = node[p]
    return node


@st.composite
def mutated(draw, files: list[Path]):
    """(the file's stem, the mutated YAML text): one to three mutations of one example file."""
    path = draw(st.sampled_from(files))
    data = yaml.safe_load(path.read_text())
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        where = draw(st.sampled_from(paths))
        parent, key = _get(data, where[:-1]), where[-1]
        kind = draw(st.sampled_from(["value", "value", "drop", "typo", "duplicate", "wrap"]))
        if kind == "value":
            parent[key] = copy.deepcopy(draw(st.sampled_from(EXTREMES)))
        elif kind == "drop":
            del parent[key]
        elif kind == "typo" and isinstance(parent, dict) and isinstance(key, str) and key:
            i = draw(st.integers(0, len(key) - 1))
            parent[key[:i] + key[i + 1:] + draw(st.sampled_from(["", "s", "_"]))] = parent.pop(key)
        elif kind == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        elif kind == "wrap":
            parent[key] = draw(st.sampled_from([[parent[key]], {"value": parent[key]}, str(parent[key])[:200]]))
    return path.stem, yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def _run(capsys, argv: list[str]) -> int:
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, code, err[-2000:])
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    return code


COMMON = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _validate_then_build(capsys, folder: Path, text: str, command: str) -> None:
    """validate the file; when it passes, build it (`merge` or `moe`) into folder/out."""
    config = folder / "config.yaml"
    config.write_text(text)
    if _run(capsys, ["validate", str(config)]) == 0:
        _run(capsys, [command, str(config), str(folder / "out"), "--no-progress"])


@settings(max_examples=SCALE or 150, **COMMON)
@given(case=mutated(RECIPES))
def test_mutated_recipes_validate_and_merge_or_exit_2(case, tmp_path_factory, capsys):
    stem, text = case
    _validate_then_build(capsys, tmp_path_factory.mktemp(stem), text, "merge")


@settings(max_examples=SCALE or 60, **COMMON)
@given(case=mutated(MOE))
def test_mutated_moe_configs_validate_and_build_or_exit_2(case, tmp_path_factory, capsys):
    stem, text = case
    _validate_then_build(capsys, tmp_path_factory.mktemp(stem), text, "moe")


@settings(max_examples=SCALE // 10 if SCALE else 25, **COMMON)
@given(case=mutated(SPACES))
def test_mutated_spaces_validate_or_exit_2(case, tmp_path_factory, capsys):
    stem, text = case
    folder = tmp_path_factory.mktemp(stem)
    space = folder / f"{stem}.yaml"
    # relative paths in the examples (tasks_dir ../examples/...) keep meaning what they meant
    space.write_text(text.replace("../examples/", f"{ROOT}/examples/"))
    _run(capsys, ["validate", str(space)])
