"""Hostile and mistaken input: one line naming the field, the value and the fix, exit 2, nothing written.

Each case here once ended in a raw traceback, a late crash after files were written, a hang, or a path
outside `--model-root` (issue 26). They run through the CLI entry point in process, on the toy family.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import textwrap
import time
from pathlib import Path

import pytest

from evomerge.cli import main

ROOT = Path(__file__).resolve().parents[1]

SLERP = """
name: rel
models: [toy:up, toy:rev]
method: slerp
objective:
  tasks_dir: {tasks_dir}
  tasks: {tasks}
{extra}search: {{trials: 2, seed: 0, limit: 8, top_k: 1}}
"""


NAMED = "  splits: {search: search, select: select, report: report}\n"  # the toy tasks come split


def space(tmp_path: Path, *, tasks="[toy_up, toy_rev]", tasks_dir="toy", extra=NAMED, name="space.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(SLERP.format(tasks=tasks, tasks_dir=tasks_dir, extra=extra)))
    return p


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def carved_task(tmp_path: Path, lines: list[str]) -> Path:
    """A folder with one un-split task `rel_up` over a JSONL holding `lines`."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "up.jsonl").write_text("".join(line + "\n" for line in lines))
    (folder / "rel_up.yaml").write_text(textwrap.dedent(f"""\
        task: rel_up
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: {folder / 'up.jsonl'}}}}}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{prompt}}}}"
        doc_to_target: "{{{{answer}}}}"
        generation_kwargs: {{until: ["\\n"], max_gen_toks: 8}}
        metric_list: [{{metric: exact_match}}]
        """))
    return folder


def good_rows(n: int) -> list[str]:
    return [json.dumps({"prompt": f"up w{i}x=", "answer": f"W{i}X"}) for i in range(n)]


def test_a_non_integer_max_gen_toks_is_refused_where_the_protocol_is_read(tmp_path, capsys):
    p = space(tmp_path, extra=NAMED + "  protocol: {gen_kwargs: {max_gen_toks: eight}}\n")
    code, err = run(capsys, "search", p, "--out", tmp_path / "out", "--no-progress")
    assert code == 2 and "gen_kwargs.max_gen_toks must be a whole number" in err and "'eight'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lines, message", [
    (good_rows(30) + ['{"prompt": "up x=", "answer": '], "JSON parse error"),
    ([], "is the file empty?"),
])
def test_a_broken_or_empty_task_file_is_refused_naming_the_task(tmp_path, capsys, lines, message):
    folder = carved_task(tmp_path, lines)
    p = space(tmp_path, tasks="[rel_up]", tasks_dir=str(folder), extra="")
    code, err = run(capsys, "search", p, "--out", tmp_path / "out", "--no-progress")
    assert code == 2 and "rel_up" in err and message in err and "Fix:" in err, err
    assert not (tmp_path / "out").exists()


def test_a_seed_beyond_the_generators_range_is_refused_before_anything_is_written(tmp_path, capsys):
    code, err = run(capsys, "search", space(tmp_path), "--out", tmp_path / "out", "--seed", str(2**32),
                    "--no-progress")
    assert code == 2 and "--seed" in err and "4294967295" in err
    assert not (tmp_path / "out").exists()
    bad = space(tmp_path, name="s2.yaml")
    bad.write_text(bad.read_text().replace("seed: 0", f"seed: {2**40}"))
    code, err = run(capsys, "validate", bad)
    assert code == 2 and "search.seed" in err


def test_an_moe_random_seed_too_large_for_torch_is_refused_by_validate(tmp_path, capsys):
    text = (ROOT / "examples" / "toy_moe.yaml").read_text()
    cfg = tmp_path / "moe.yaml"
    cfg.write_text(text + f"\nrandom_seed: {2**64}\n")
    code, err = run(capsys, "validate", cfg)
    assert code == 2 and "random_seed" in err


def test_storage_below_a_file_is_refused_before_the_run_folder_is_made(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = run(capsys, "search", space(tmp_path), "--out", tmp_path / "out", "--no-progress",
                    "--storage", f"sqlite:///{tmp_path / 'afile' / 'study.db'}")
    assert code == 2 and "--storage" in err and "is a file" in err
    assert not (tmp_path / "out").exists()


def test_out_below_a_file_is_refused_before_the_preflight(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    t0 = time.perf_counter()
    code, err = run(capsys, "search", space(tmp_path), "--out", tmp_path / "afile" / "run", "--no-progress")
    assert code == 2 and "is a file" in err
    code, err = run(capsys, "eval", ROOT / "evomerge" / "toy" / "data" / "base", "--space", space(tmp_path),
                    "--out", tmp_path / "afile" / "eval")
    assert code == 2 and "--out" in err and "is a file" in err
    assert time.perf_counter() - t0 < 60  # no model was scored first (that alone takes longer on CI)


@pytest.mark.parametrize("damage", ["study", "evidence", "evidence_shape"])
def test_audit_of_a_damaged_run_folder_is_exit_2(tmp_path, capsys, damage):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    db = run_dir / "study.db"
    if damage == "study":
        db.write_bytes(b"SQLite format 3\x00" + b"\x00" * 50)  # a truncated database
    else:
        sqlite3.connect(db).close()
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        optuna.create_study(study_name="evomerge", storage=f"sqlite:///{db}")
        (run_dir / "evidence.json").write_text('{"models": {"x": ' if damage == "evidence" else "[1, 2]")
    code, err = run(capsys, "audit", run_dir)
    assert code == 2 and "damaged" in err, err


def test_a_chat_template_that_trips_the_sandbox_is_a_refusal_not_a_traceback(tmp_path, capsys):
    from evomerge.toy.family import family

    tok = tmp_path / "tok"
    shutil.copytree(family().tokenizer, tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    p = space(tmp_path, extra=NAMED + "  protocol: {apply_chat_template: true}\n")
    p.write_text(p.read_text().replace("method: slerp", f"tokenizer: {tok}\nmethod: slerp"))
    code, err = run(capsys, "search", p, "--out", tmp_path / "out", "--no-progress")
    assert code == 2 and "objective.protocol" in err and "SecurityError" in err, err
    assert not (tmp_path / "out").exists()


def test_malformed_reference_items_are_refused_before_the_search(tmp_path, capsys):
    ref = tmp_path / "ref.jsonl"
    ref.write_text('{"text": "fine"}\n{"text": \n')
    p = space(tmp_path, extra=NAMED + f"  reference_items: {ref}\n")
    code, err = run(capsys, "search", p, "--out", tmp_path / "out", "--no-progress")
    assert code == 2 and "line 2" in err and "reference_items" in err
    assert not (tmp_path / "out").exists()


def test_an_alias_bomb_fails_at_once(tmp_path, capsys):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    code, err = run(capsys, "validate", bomb)
    assert code == 2 and "alias" in err
    assert time.perf_counter() - t0 < 10  # the old walk was still running after 60 s
    loop = tmp_path / "loop.yaml"
    loop.write_text("merge_method: linear\nmodels: &m [*m]\n")
    code, err = run(capsys, "validate", loop)
    assert code == 2 and "refers to a block that contains it" in err


def test_aliases_within_the_budget_still_work(tmp_path, capsys):
    from evomerge.yamlfile import parse

    data = parse("w: &w {weight: 0.5}\nmodels: [{model: a, parameters: *w}, {model: b, parameters: *w}]\n",
                 where="x.yaml")
    assert data["models"][1]["parameters"] == {"weight": 0.5}


def test_an_unknown_task_is_refused_without_indexing_lm_evals_tasks(tmp_path, monkeypatch):
    """A name that no built-in task file mentions is refused from a plain-text look at those files; lm-eval's
    own index (seconds, a minute on a busy machine) is never built for it."""
    import lm_eval.tasks

    from evomerge.errors import ConfigError
    from evomerge.evaluation.evaluate import task_manager
    from evomerge.evaluation.protocol import SplitSpec

    built = []
    real = lm_eval.tasks.TaskManager

    def counting(*args, **kwargs):
        built.append(kwargs.get("include_defaults"))
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", counting)
    with pytest.raises(ConfigError, match="did you mean 'hellaswag'"):
        task_manager(["hellaswg"], None, SplitSpec(mode="whole"))
    assert True not in built


@pytest.mark.parametrize("name, model", [("dotdot", "/elsewhere/.."), ("symlink", "/x/base")])
def test_model_root_never_leads_outside_it(tmp_path, capsys, name, model):
    from evomerge.toy.family import family

    fam = family()
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(fam.experts["up"], root / "up")
    (root / "base").symlink_to(fam.base)  # a folder under ROOT that is really elsewhere
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - {{model: {model}, parameters: {{weight: 1}}}}\n"
                      "  - {model: /x/up, parameters: {weight: 1}}\n")
    for argv in (["validate", recipe, "--model-root", root], ["merge", recipe, tmp_path / "out", "--model-root", root]):
        code, err = run(capsys, *argv)
        assert code == 2 and "--model-root" in err, err
    assert not (tmp_path / "out").exists()


def test_any_other_exception_is_an_internal_error_with_the_traceback_in_a_file(tmp_path, capsys, monkeypatch):
    import evomerge.cli as cli

    def broken(args):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(cli, "_run_merge", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    code = cli.main(["merge", "x.yaml", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == cli.INTERNAL_ERROR and "internal error (ZeroDivisionError: planted)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    saved = list(tmp_path.glob("evomerge-crash-*.txt"))
    assert len(saved) == 1 and "ZeroDivisionError: planted" in saved[0].read_text() and "Traceback" in saved[0].read_text()
