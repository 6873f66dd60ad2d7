"""The evidence a run carries: overlap audit, benchmark lint, and the report's statistics.

- Planted overlaps are caught (an identical item, a near-identical one with one word changed, a
  duplicate across two tasks) and stop the search before anything is written; clean splits pass;
  `--allow-overlap` runs and the report says so.
- The lint refuses an objective named like a public benchmark, and accepts it with the loud flag,
  which marks the report.
- A finished search's report carries intervals, paired tests against parents, baselines and naive
  merges, the search -> select -> report drop, truncation rates, and a chart; evidence.json agrees
  with an independent recomputation from the stored per-item scores.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.evaluation.overlap import Item, find
from evomerge.search.study import load_run_study

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LONG = "the quick brown fox jumps over the lazy dog near the river bank at dawn today"


def _key(prompt: str, target: str) -> str:
    from evomerge.evaluation.splits import content_key

    return content_key(prompt, target)


def test_overlap_finds_planted_duplicates_and_passes_clean_splits():
    clean = [Item("t", "search", 0, _key(LONG, "a")), Item("t", "report", 1, _key("entirely different words here", "b"))]
    assert find(clean) == []
    one_word = LONG.replace("lazy", "sleepy")
    planted = clean + [
        Item("t", "select", 2, _key(LONG, "a")),  # identical to a search item
        Item("t", "report", 3, _key(one_word, "a")),  # one word changed: shares 8-word runs
        Item("u", "search", 0, _key("entirely different words here", "b")),  # the same item in another task
        Item("t", "search", 9, _key(LONG, "a")),  # a repeat inside one split: not leakage
    ]
    kinds = sorted((f.kind, f.a.split, f.b.task + "/" + f.b.split) for f in find(planted))
    assert kinds == [("duplicate", "report", "u/search"), ("duplicate", "search", "t/select"),
                     ("near-duplicate", "search", "t/report")]


def _tasks(d: Path, *, plant: bool) -> Path:
    """Two pre-split generation tasks (search/select/report), with planted leaks when `plant`."""
    from localtasks import GEN_TASK, words

    d.mkdir(parents=True, exist_ok=True)
    ws = words(90, 7)
    splits = {"search": ws[:50], "select": ws[50:70], "report": ws[70:]}
    for task, fn in (("mine_up", str.upper), ("mine_rev", lambda w: w[::-1])):
        for split, chunk in splits.items():
            rows = [{"prompt": f"{task[5:]} {w}=", "answer": fn(w)} for w in chunk]
            if plant and task == "mine_up" and split == "report":
                rows.append({"prompt": f"up {ws[0]}=", "answer": ws[0].upper()})  # a search item, again
            f = d / f"{task}_{split}.jsonl"
            f.write_text("".join(json.dumps(r) + "\n" for r in rows))
            (d / f"{task}_{split}.yaml").write_text(GEN_TASK.format(name=f"{task}_{split}", file=f))
    return d


def _space(tmp: Path, tasks_dir: Path, task_names=("mine_up", "mine_rev"), trials: int = 3,
           reference: Path | None = None) -> Path:
    tasks = "".join(f"    - {{task: {t}, metric: exact_match}}\n" for t in task_names)
    if reference is not None:
        tasks += f"  reference_items: {reference}\n"
    p = tmp / "space.yaml"
    p.write_text(textwrap.dedent(f"""\
        name: ev
        models: [toy:up, toy:rev]
        method: slerp
        parameters: {{slerp: {{t: {{low: 0.0, high: 1.0}}}}}}
        objective:
          tasks_dir: {tasks_dir}
          splits: {{search: search, select: select, report: report}}
          tasks:
        """) + tasks + f"search: {{trials: {trials}, sampler: random, seed: 0, limit: 16, top_k: 1}}\n")
    return p


def test_search_stops_on_a_leak_and_runs_with_allow_overlap(tmp_path, capsys):
    tasks = _tasks(tmp_path / "tasks", plant=True)
    space = _space(tmp_path, tasks)
    out = tmp_path / "run"
    assert main(["search", str(space), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "objective: 1 item(s) occur in two splits or two tasks" in err and "duplicate" in err
    assert "mine_up_search" in err and "mine_up_report" in err and "--allow-overlap" in err
    assert not out.exists()
    assert main(["search", str(space), "--out", str(out), "--no-progress", "--allow-overlap", "--trials", "1"]) == 0
    report = (out / "report.md").read_text()
    assert "WARNING: the overlap audit found 1 duplicate" in report


def test_public_benchmark_lint(tmp_path, capsys):
    tasks = _tasks(tmp_path / "tasks", plant=False)
    for split in ("search", "select", "report"):  # the same data under a public benchmark's name
        text = (tasks / f"mine_up_{split}.yaml").read_text().replace(f"task: mine_up_{split}", f"task: gsm8k_mine_{split}")
        (tasks / f"gsm8k_mine_{split}.yaml").write_text(text)
    space = _space(tmp_path, tasks, task_names=("gsm8k_mine", "mine_rev"))
    out = tmp_path / "run"
    assert main(["search", str(space), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "objective.tasks[0].task: the objective searches on public benchmark test sets: gsm8k_mine (GSM8K)" in err
    assert "--allow-public-benchmark-contamination" in err and not out.exists()
    assert main(["validate", str(space)]) == 2
    assert main(["validate", str(space), "--allow-public-benchmark-contamination"]) == 0
    assert "WARNING: searched on public benchmark" in capsys.readouterr().out
    assert main(["search", str(space), "--out", str(out), "--no-progress", "--trials", "1",
                 "--allow-public-benchmark-contamination"]) == 0
    assert "WARNING: searched on public benchmark test sets (gsm8k_mine (GSM8K))" in (out / "report.md").read_text()
    assert "WARNING: searched on public benchmark" in (out / "best.yaml").read_text()


@pytest.mark.slow
def test_report_carries_intervals_paired_tests_drop_and_truncation(tmp_path):
    from evomerge.evaluation import stats

    from localtasks import words

    tasks = _tasks(tmp_path / "tasks", plant=False)
    ref = tmp_path / "reference.jsonl"  # items of both skills that are in no split
    ref.write_text("".join(json.dumps({"prompt": f"up {w}=", "answer": w.upper()}) + "\n" for w in words(200, 99)[-40:]))
    space = _space(tmp_path, tasks, trials=4, reference=ref)
    out = tmp_path / "run"
    assert main(["search", str(space), "--out", str(out), "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    assert "## Evidence: intervals and paired tests (report split)" in report
    assert "## Parent audit: lineage and membership evidence" in report and "Min-K%++ AUROC" in report
    assert "overlap audit: 180 items, no duplicate" in report
    assert "Winner's curse: the winner scored" in report
    assert (out / "plots" / "report_scores.png").stat().st_size > 1000
    ev = json.loads((out / "evidence.json").read_text())
    labels = set(ev["models"])
    assert {"parent:up", "parent:rev", "baseline:slerp", "naive:linear (uniform)"} <= labels
    assert ev["winner"] in labels and set(ev["paired"]) == labels - {ev["winner"]}
    # recompute one pair independently from the stored per-item scores
    import optuna

    study = load_run_study(f"sqlite:///{out / 'study.db'}")
    cache = study.user_attrs["report_scores"]
    w_items = cache[ev["winner"]]["items"]
    assert ev["models"][ev["winner"]]["report"]["point"] == pytest.approx(
        stats.mixture(w_items, {"mine_up": 1, "mine_rev": 1}))
    up = cache["parent:up"]["items"]
    diffs = [a - b for t in ("mine_up", "mine_rev") for a, b in zip(w_items[t], up[t])]
    means = [sum(a - b for a, b in zip(w_items[t], up[t])) / len(up[t]) for t in ("mine_up", "mine_rev")]
    assert ev["paired"]["parent:up"]["delta"]["point"] == pytest.approx(sum(means) / 2)
    assert ev["paired"]["parent:up"]["wins"] == sum(d > 0 for d in diffs)
    for m in ev["models"].values():
        assert m["report"]["low"] <= m["report"]["point"] <= m["report"]["high"]
        assert set(m["truncated"]) == {"mine_up_report", "mine_rev_report"}
    for label in ("parent:up", "parent:rev", ev["winner"]):
        mem = ev["parents"][label]["membership"]
        assert 0 <= mem["auroc"] <= 1 and mem["reference_items"] == 40 and mem["report_items"] == 40
    drop = ev["drop"]
    assert drop["report"] == pytest.approx(ev["models"][ev["winner"]]["report"]["point"])


def test_audit_of_a_run_and_of_a_run_that_broke_its_protocol(tmp_path, capsys):
    import optuna

    from evomerge.search.record import note_report

    tasks = _tasks(tmp_path / "tasks", plant=False)
    space = _space(tmp_path, tasks, trials=2)
    out = tmp_path / "run"
    assert main(["search", str(space), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["audit", str(out)]) == 0
    text = capsys.readouterr().out
    for part in ("## Protocol, splits and items", "items mine_up_report: report", "overlap audit: 180 items",
                 "## Evidence: intervals and paired tests", "the run kept its protocol"):
        assert part in text, part
    study = load_run_study(f"sqlite:///{out / 'study.db'}")
    note_report(study, ["trial 0"])  # a second look at the report split
    assert main(["audit", str(out)]) == 1
    assert "BROKEN: the report split was evaluated 2 times" in capsys.readouterr().out
    assert main(["audit", str(tmp_path / "tasks")]) == 2  # not a run folder


def test_eval_scores_models_on_whole_tasks_with_paired_tests(tmp_path, capsys):
    from evomerge.toy.family import family

    tasks = _tasks(tmp_path / "tasks", plant=False)
    fam = family()
    out = tmp_path / "eval"
    models = [str(fam.experts["up"]), str(fam.experts["rev"]), str(fam.base)]
    assert main(["eval", *models, "--tasks", "mine_up_report", "mine_rev_report:exact_match", "--tasks-dir",
                 str(tasks), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| up |" in text and "minus up" in text
    res = json.loads((out / "eval.json").read_text())
    assert list(res["models"]) == ["up", "rev", "base"] and res["reference"] == "up"
    assert res["models"]["up"]["items"] == {"mine_up_report": 20, "mine_rev_report": 20}
    up, rev = res["models"]["up"]["tasks"], res["models"]["rev"]["tasks"]
    assert up["mine_up_report"] > rev["mine_up_report"] and rev["mine_rev_report"] > up["mine_rev_report"]
    assert set(res["paired_vs_first"]) == {"rev", "base"}
    assert (out / "eval.png").stat().st_size > 1000 and (out / "eval.md").read_text().startswith("| model |")
    # mistakes: exit 2 before any scoring
    assert main(["eval", *models]) == 2
    assert "--space SPACE or --tasks" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope"), "--tasks", "mine_up_report", "--tasks-dir", str(tasks)]) == 2


@pytest.mark.slow
def test_eval_reproduces_the_readme_toy_table_within_its_intervals(tmp_path, monkeypatch):
    """`evomerge eval` of the best merge and two experts on the toy space's report split: the README's
    numbers (0.778, 0.630, 0.662) fall inside the intervals."""
    from evomerge.toy.family import family

    repo = Path(__file__).resolve().parents[1]
    merged = tmp_path / "best"
    monkeypatch.chdir(repo)  # the example's paths are relative to the repository root
    assert main(["merge", "examples/toy_best_search.yaml", str(merged), "--no-progress"]) == 0
    fam = family()
    assert main(["eval", str(merged), str(fam.experts["up"]), str(fam.experts["next"]), "--space",
                 str(repo / "search_spaces" / "toy_task_arithmetic.yaml"), "--out", str(tmp_path / "e")]) == 0
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    for label, readme in (("best", 0.778), ("up", 0.630), ("next", 0.662)):
        m = res["models"][label]["mixture"]
        assert m["low"] <= readme <= m["high"], (label, m)


@pytest.mark.slow
def test_min_k_pp_separates_trained_items_from_fresh_ones():
    """A toy expert fine-tuned (language-model loss) on 64 items: those items score clearly apart from
    64 fresh items of the same skill; before that training, and on the toy family's held-out report
    items, there is no such sign (AUROC near 0.5)."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluation.membership import min_k_pp
    from evomerge.evaluation.stats import auroc
    from evomerge.toy import training
    from evomerge.toy.family import family
    from evomerge.toy.skills import drawer

    fam = family()
    tok = AutoTokenizer.from_pretrained(str(fam.experts["up"]))
    rng, seen, pairs = random.Random(123), set(), []
    while len(pairs) < 128:
        p, a = drawer("up")(rng)
        if p not in seen:
            seen.add(p)
            pairs.append((p, a))
    trained, fresh = pairs[:64], pairs[64:]
    texts = lambda ps: [f"{p}{a}" for p, a in ps]  # noqa: E731
    model = AutoModelForCausalLM.from_pretrained(str(fam.experts["up"]), dtype=torch.float32)
    before = auroc(min_k_pp(model, tok, texts(trained)), min_k_pp(model, tok, texts(fresh)))
    assert 0.35 < before < 0.65
    torch.manual_seed(0)
    ids, mask, _ = training.collate(trained)
    labels = ids.clone()
    labels[mask == 0] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(80):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = auroc(min_k_pp(model, tok, texts(trained)), min_k_pp(model, tok, texts(fresh)))
    assert after > 0.85, after  # measured: 0.925
