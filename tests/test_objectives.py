"""Objectives over un-split lm-eval tasks (issue: carved splits under one frozen protocol), end to end.

Everything is offline: the models are the embedded toy family's `up` and `rev` experts, the tasks are
written by the tests (one JSONL file of upper-casing items; a copy of lm-eval's own arc_easy YAML with
its dataset pointed at local JSON; a group over both skills). Checked: a carved search runs through
the CLI and writes a record; the report split is evaluated once, after every search and select call;
no select or report item ever appears in a few-shot prompt; a changed protocol on resume is refused;
unknown task, metric and split mistakes exit 2 before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.evaluation.evaluate import LMEvalEvaluator
from evomerge.evaluation.protocol import ScoringProtocol, SplitSpec
from localtasks import write_tasks

CALLS: list[tuple[str, int | None]] = []  # (split, limit) of every evaluate call of the counting plug-in


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def space_yaml(tmp: Path, tasks_dir: Path, *, extra: str = "", tasks: str | None = None, trials: int = 3,
               limit: int = 24) -> Path:
    tasks = tasks or "    - {task: my_up, weight: 1, metric: exact_match}\n    - {task: mc_easy, weight: 1, metric: acc_norm}\n"
    text = (
        "name: carved\nmodels: [toy:up, toy:rev]\nmethod: slerp\n"
        "parameters: {slerp: {t: {low: 0.0, high: 1.0}}}\n"
        f"objective:\n  tasks_dir: {tasks_dir}\n  tasks:\n{tasks}{extra}"
        f"search: {{trials: {trials}, sampler: random, seed: 0, limit: {limit}, top_k: 2}}\n"
    )
    p = tmp / "space.yaml"
    p.write_text(text)
    return p


def _plugin_calls() -> list:
    """The CALLS list of the module the worker imports the plug-in from (pytest may import this file
    under another name)."""
    import importlib

    return importlib.import_module("tests.test_objectives").CALLS


def counting_evaluator(spec):
    """Plug-in evaluator (WorkerSpec.evaluator): the real LMEvalEvaluator, recording each call."""
    from transformers import AutoTokenizer

    inner = LMEvalEvaluator(AutoTokenizer.from_pretrained(spec.tokenizer), list(spec.tasks), spec.include_path,
                            splits=SplitSpec.model_validate(spec.splits),
                            protocol=ScoringProtocol.model_validate(spec.protocol))

    class Counting:
        def sizes(self, split):
            return inner.sizes(split)

        def record(self):
            return inner.record()

        def evaluate(self, model, split, *, limit=None, seed=0):
            CALLS.append((split, limit))
            return inner.evaluate(model, split, limit=limit, seed=seed)

    return Counting()


def test_carved_search_end_to_end_touches_report_once(tmp_path, tasks_dir, capsys):
    """One JSONL task plus a copied multiple-choice built-in task, carved; the report split is
    evaluated once per report candidate, after every search and select evaluation."""
    calls = _plugin_calls()
    calls.clear()
    space = space_yaml(tmp_path, tasks_dir)
    out = tmp_path / "run"
    code = main(["search", str(space), "--out", str(out), "--no-progress",
                 "--evaluator", "tests.test_objectives:counting_evaluator"])
    assert code == 0, capsys.readouterr().err
    splits_seen = [s for s, _ in calls]
    first_report = splits_seen.index("report")
    assert "report" not in splits_seen[:first_report] and set(splits_seen[first_report:]) == {"report"}
    assert splits_seen[0] == "search" and calls[0][1] == 1  # the pre-flight's one-item dry run
    record = json.loads((out / "record.json").read_text())
    assert len(record["report_evaluations"]) == 1
    reported = record["report_evaluations"][0]["candidates"]
    assert splits_seen.count("report") == len(reported) and {"parent:up", "parent:rev"} <= set(reported)
    items = record["record"]["items"]
    assert set(items) == {"my_up", "mc_easy"}
    up = items["my_up"]["splits"]
    assert sum(up[r]["items"] for r in ("search", "select", "report")) == 150
    assert items["mc_easy"]["splits"]["report"]["items"] > 0 and items["mc_easy"]["files"]
    best = (out / "best.yaml").read_text()
    assert "# protocol: num_fewshot 0" in best and "report split evaluated 1 time(s)" in best
    assert "items my_up: search" in best
    # a second run of the finished study does not touch the report again
    calls.clear()
    assert main(["search", str(space), "--out", str(out), "--no-progress",
                 "--evaluator", "tests.test_objectives:counting_evaluator"]) == 0
    assert "report" not in [s for s, _ in calls]
    assert len(json.loads((out / "record.json").read_text())["report_evaluations"]) == 1


def test_changed_protocol_on_resume_is_refused(tmp_path, tasks_dir, capsys):
    space = space_yaml(tmp_path, tasks_dir, trials=2, tasks="    - {task: my_up, metric: exact_match}\n")
    out = tmp_path / "run"
    assert main(["search", str(space), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    space = space_yaml(tmp_path, tasks_dir, trials=2, tasks="    - {task: my_up, metric: exact_match}\n",
                       extra="  protocol: {num_fewshot: 2}\n")
    assert main(["search", str(space), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "another protocol" in err and "protocol.num_fewshot: 0 -> 2" in err
    space = space_yaml(tmp_path, tasks_dir, trials=2, tasks="    - {task: my_up, metric: exact_match}\n",
                       extra="  splits: {carve: {search: 0.5, select: 0.25, report: 0.25}}\n")
    assert main(["search", str(space), "--out", str(out), "--no-progress"]) == 2
    assert "splits.fractions.search: 0.6 -> 0.5" in capsys.readouterr().err


def test_no_select_or_report_item_in_any_fewshot_prompt(tasks_dir):
    """3-shot on a task with no few-shot split of its own: the examples come from a pool carved out
    of search; on a task with a train split (mc_easy): from there. Checked on every prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.toy.family import family

    fam = family()
    tok = AutoTokenizer.from_pretrained(fam.experts["up"])
    model = AutoModelForCausalLM.from_pretrained(fam.experts["up"])
    ev = LMEvalEvaluator(tok, ["my_up", "mc_easy"], str(tasks_dir), splits=SplitSpec(),
                         protocol=ScoringProtocol(num_fewshot=3))
    rows = [json.loads(line) for line in (tasks_dir / "up.jsonl").read_text().splitlines()]
    leaf = ev.view("search").leaves["my_up"]
    assert leaf.fewshot_source == "search-pool" and ev.view("search").leaves["mc_easy"].fewshot_source == "task"
    held_out = [rows[i] for r in ("select", "report") for i in leaf.carving.indices[r]]
    pool = [rows[i] for i in leaf.carving.fewshot]
    shown_pool = 0
    for split in ("search", "select", "report"):
        res = ev.evaluate(model, split, per_item=True)
        prompts = [p for ps in res.prompts["my_up"].values() for p in ps]
        assert len(prompts) == len(leaf.carving.indices[split])
        for p in prompts:
            assert not any(f"{r['prompt']}{r['answer']}" in p for r in held_out), p
            assert p.count("\n") == 3  # three examples, each on its own line
        shown_pool += sum(any(f"{r['prompt']}{r['answer']}" in p for p in prompts) for r in pool)
        arc = [p for ps in res.prompts["mc_easy"].values() for p in ps]
        test_questions = [json.loads(x)["question"] for x in (tasks_dir / "arc_test.json").read_text().splitlines()]
        for p in arc:
            assert sum(q in p for q in test_questions) == 1  # only the item itself; examples are from train
    assert shown_pool > 0  # the examples really come from the pool


def test_group_task_and_explicit_named_splits(tasks_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.toy.family import family

    fam = family()
    tok = AutoTokenizer.from_pretrained(fam.experts["up"])
    model = AutoModelForCausalLM.from_pretrained(fam.experts["up"])
    ev = LMEvalEvaluator(tok, ["my_skills"], str(tasks_dir), splits=SplitSpec(seed=4))
    assert set(ev.sizes("report")) == {"my_up", "my_rev"}
    res = ev.evaluate(model, "report", limit=10)
    assert "exact_match" in res.metrics["my_skills"] and res.samples == {"my_up": 10, "my_rev": 10}
    # the group's score is the unweighted mean of its members, scored on the same carved items
    group = ev.evaluate(model, "select").metrics["my_skills"]["exact_match"]
    members = LMEvalEvaluator(tok, ["my_up", "my_rev"], str(tasks_dir), splits=SplitSpec(seed=4))
    assert members.sizes("select") == ev.sizes("select")  # carving is per item, not per task list
    m = members.evaluate(model, "select").metrics
    up, rev = m["my_up"]["exact_match"], m["my_rev"]["exact_match"]
    assert up > rev  # the up expert is better at its own skill
    assert group == pytest.approx((up + rev) / 2)
    named = LMEvalEvaluator(tok, ["toy_up"], str(fam.tasks_dir), splits=SplitSpec(mode="named"))
    assert named.sizes("report") == {"toy_up_report": 300}
    # the record hashes the task YAML, the YAML it includes (generation settings) and the data
    files = named.record()["toy_up_report"]["files"]
    assert set(files) == {"toy_up_report.yaml", "_toy_common.yaml", "up_report.jsonl"}, files


@pytest.mark.parametrize("tasks, extra, where, message", [
    ("    - {task: my_upp, metric: exact_match}\n", "", "objective.tasks[0].task", "did you mean 'my_up'"),
    ("    - {task: my_up, metric: exact_matc}\n", "", "objective.tasks[0].metric", "has no metric 'exact_matc'"),
    ("    - {task: my_up, metric: exact_match}\n", "  splits: {search: search, select: select, report: report}\n",
     "objective.tasks[0].task", "unknown lm-eval task 'my_up_search'"),
    ("    - {task: my_up, metric: exact_match}\n", "  splits: {carve: {search: 0.6, select: 0.3, report: 0.2}}\n",
     "objective.splits", "sum to 1.1"),
    ("    - {task: my_up, metric: exact_match}\n", "  splits: {carve: {search: 0.6, selct: 0.2, report: 0.2}}\n",
     "objective.splits.carve", "did you mean 'select'"),
    ("    - {task: my_up, metric: exact_match}\n", "  protocol: {num_fewshots: 2}\n",
     "objective.protocol", "did you mean 'num_fewshot'"),
    ("    - {task: my_up, metric: exact_match}\n", "  protocol: {apply_chat_template: true}\n",
     "objective.protocol.apply_chat_template", "has no chat template"),
    ("    - {task: my_up, metric: exact_match, direction: minimize}\n", "", "objective.tasks[0].direction",
     "says higher exact_match is better, but the objective would minimize it"),
    ("    - {task: my_up, metric: exact_match}\n", "  protocol: {gen_kwargs: {max_gen_tok: 8}}\n",
     "objective.protocol.gen_kwargs.max_gen_tok", "did you mean 'max_gen_toks'"),
])
def test_setup_mistakes_exit_2_before_anything_is_written(tmp_path, tasks_dir, capsys, tasks, extra, where, message):
    space = space_yaml(tmp_path, tasks_dir, tasks=tasks, extra=extra)
    out = tmp_path / "run"
    assert main(["search", str(space), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert where in err and message in err, err
    assert not out.exists()


def test_search_limit_larger_than_the_search_split_is_refused(tmp_path, tasks_dir, capsys):
    space = space_yaml(tmp_path, tasks_dir, tasks="    - {task: my_up, metric: exact_match}\n", limit=140)
    assert main(["search", str(space), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "search.limit" in err and "fewer than search.limit 140" in err
    assert not (tmp_path / "run").exists()


def test_validate_prints_the_objective(tmp_path, tasks_dir, capsys):
    space = space_yaml(tmp_path, tasks_dir)
    assert main(["validate", str(space)]) == 0
    out = capsys.readouterr().out
    assert "my_up/exact_match" in out and "mc_easy/acc_norm" in out
    assert "carved by content hash" in out and "items my_up: search" in out and "num_fewshot 0" in out


CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_chat_template_system_instruction_and_multiturn_fewshot(tmp_path, tasks_dir, capsys):
    """`apply_chat_template` with a system instruction and few-shot as turns: every prompt, generation
    and multiple choice, is the tokenizer's chat rendering; a search through the CLI runs with it and
    writes it into the run record."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.toy.family import family

    fam = family()
    tok = AutoTokenizer.from_pretrained(fam.tokenizer)
    tok.chat_template = CHAT
    tok.save_pretrained(tmp_path / "chat_tok")
    model = AutoModelForCausalLM.from_pretrained(fam.experts["up"])
    protocol = ScoringProtocol(num_fewshot=2, apply_chat_template=True, fewshot_as_multiturn=True,
                               system_instruction="Be brief.")
    ev = LMEvalEvaluator(tok, ["my_up", "mc_easy"], str(tasks_dir), splits=SplitSpec(), protocol=protocol)
    res = ev.evaluate(model, "search", limit=3, per_item=True)
    for task in ("my_up", "mc_easy"):
        prompts = [p for ps in res.prompts[task].values() for p in ps]
        assert prompts
        for p in prompts:
            assert p.startswith("<system>Be brief.</system><user>") and p.endswith("<assistant>"), p
            assert p.count("<user>") == 3 and p.count("</assistant>") == 2, p  # two shots as turns + the item
    plain = LMEvalEvaluator(tok, ["my_up"], str(tasks_dir), splits=SplitSpec(),
                            protocol=ScoringProtocol(num_fewshot=2)).evaluate(model, "search", limit=3, per_item=True)
    assert not any("<user>" in p for ps in plain.prompts["my_up"].values() for p in ps)

    extra = ("  protocol: {num_fewshot: 1, apply_chat_template: true, system_instruction: Be brief.}\n"
             f"tokenizer: {tmp_path / 'chat_tok'}\n")
    space = space_yaml(tmp_path, tasks_dir, tasks="    - {task: my_up, metric: exact_match}\n", extra=extra,
                       trials=2, limit=8)
    out = tmp_path / "run"
    assert main(["search", str(space), "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    protocol_rec = json.loads((out / "record.json").read_text())["record"]["protocol"]
    assert protocol_rec["apply_chat_template"] is True and protocol_rec["system_instruction"] == "Be brief."


def test_custom_code_source_is_refused_before_anything_is_written(tmp_path, tasks_dir, capsys):
    from evomerge.toy.family import family

    custom = tmp_path / "custom_up"
    shutil.copytree(family().experts["up"], custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_up.UpForCausalLM"}
    (custom / "config.json").write_text(json.dumps(cfg))
    space = space_yaml(tmp_path, tasks_dir, tasks="    - {task: my_up, metric: exact_match}\n")
    space.write_text(space.read_text().replace("models: [toy:up, toy:rev]", f"models: [{custom}, toy:rev]"))
    out = tmp_path / "run"
    assert main(["search", str(space), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "space.yaml: models[0]" in err and "needs its own code" in err and "--trust-remote-code" in err
    assert not out.exists()
