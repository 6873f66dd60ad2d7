"""The run folder: best.yaml, trials.csv, report.md and plots, written atomically.

Why it exists: a search is only useful if its result can be reproduced and judged. `best.yaml` is the
winner as a mergekit recipe (it loads in `mergekit-yaml` and `evomerge merge`) with its provenance in
YAML comments (study, trial, seed, scores on every split, source hashes, the Hub commit of each model
taken from the Hub, which the recipe then names as `org/name@commit`, evomerge version);
`trials.csv` is every trial; `report.md` compares the winner with its parents and the naive baselines
on every split; the plots (search/plots.py) show the history, the winner's per-layer curves, parameter
importances and the Pareto front of a multi-objective run. Every file is written to a temp file and renamed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any

from evomerge import __version__
from evomerge.engine.output import atomic_write
from evomerge.evaluation.splits import ROLES
from evomerge.search.record import protocol_lines, splits_text, stored
from evomerge.search.timing import wall_text

DASHBOARD_HINT = "pip install optuna-dashboard && optuna-dashboard {storage}"


# --- provenance ----------------------------------------------------------------------------------
def source_hashes(paths: list[str], cache_file: Path | None = None) -> dict[str, str]:
    """sha256 over each model folder's config.json and weight files (by name order), cached by
    (path, size, mtime) so a resumed run does not hash gigabytes again."""
    cache = {}
    if cache_file is not None and cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    out = {}
    for p in paths:
        folder = Path(p)
        files = sorted([folder / "config.json", *folder.glob("*.safetensors")])
        stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]
        entry = cache.get(p)
        if entry and entry.get("stamp") == stamp:
            out[p] = entry["sha256"]
            continue
        h = hashlib.sha256()
        for f in files:
            if not f.exists():
                continue
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        out[p] = h.hexdigest()
        cache[p] = {"stamp": stamp, "sha256": out[p]}
    if cache_file is not None:
        atomic_write(cache_file, json.dumps(cache, indent=1))
    return out


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def best_yaml(result, storage: str, hashes: dict[str, str]) -> str:
    """The winner's recipe with provenance comments."""
    w = result.winner
    space = result.space
    study = result.study
    lines = [
        f"evomerge {__version__} search winner: {w.label}, space {space.name!r}",
        f"study: {study.study_name} in {storage}",
        f"trial: {w.trial}  sampler: {study.user_attrs.get('sampler')}  seed: {space.budget.seed}",
    ]
    for split in ROLES:
        s = w.scores.get(split)
        if s:
            tasks = ", ".join(f"{k}={_fmt(v)}" for k, v in (s.get("tasks") or {}).items())
            lines.append(f"score on {split}: {_fmt(s.get('score'))} ({tasks})")
    lines += protocol_lines(*stored(study))
    lines.append("sources (sha256 of config.json + *.safetensors):")
    lines += [f"  {path}: {digest}" for path, digest in hashes.items()]
    hub = hub_sources(list(hashes))
    if hub:
        lines.append("from the Hugging Face Hub (the recipe names each by its commit; evomerge merge finds it in the "
                     "cache or downloads it):")
        lines += [f"  {o.repo}@{o.commit}: {path}" for path, o in hub.items()]
    folders = sorted({Path(m.rstrip("/")).name for m in w.recipe.referenced_models() if m not in hub})
    moved = (f"on another machine: add --model-root DIR, DIR holding the folders {', '.join(folders)}" if folders
             else "on another machine: the Hub references resolve there too")
    from evomerge.moe.config import MoEConfig

    if isinstance(w.recipe, MoEConfig):
        lines.append("reproduce the scored model: evomerge moe best.yaml OUT (a mergekit-moe config: "
                     f"mergekit-moe --random-seed {w.recipe.seed} best.yaml OUT builds the same tensors)")
        lines.append(moved)
        return w.recipe.to_yaml(comments=lines)
    from evomerge.engine.execution import merge_threads

    threads = merge_threads()  # merges are pinned to this many torch threads (bit-identical results)
    lines.append(f"reproduce the scored model: evomerge merge best.yaml OUT --threads {threads}")
    lines.append(moved)
    if space.layer_path is not None:  # a frankenmerge: mergekit-yaml builds the same tensors (no random draw)
        from evomerge.search.layer_path import path_comment

        lines.append(path_comment(space, w.recipe))
    from evomerge.engine import methods

    if methods.get(w.recipe.merge_method).uses_generator:
        lines.append(f"{w.recipe.merge_method} draws random masks: evomerge merge reproduces this draw from "
                     "random_seed; mergekit-yaml draws from its global RNG, so it gives another draw (a "
                     "different model, of the same kind)")
    return w.recipe.renamed({path: f"{o.repo}@{o.commit}" for path, o in hub.items()}).to_yaml(comments=lines)


def hub_sources(paths: list[str]) -> dict:
    """{folder: its Hub origin (repository, commit)} for the folders that are Hugging Face cache snapshots."""
    from evomerge.engine.hub import origin_of

    return {p: o for p in paths if (o := origin_of(p)) is not None}


# --- tables --------------------------------------------------------------------------------------
def trials_csv(study, space) -> str:
    """One row per trial: number, state, value(s), params, role, failure reason, timings, task values."""
    trials = study.get_trials(deepcopy=False)
    param_names = sorted({k for t in trials for k in t.params})
    task_names = [t.task for t in space.objective.tasks]
    multi = space.objective.multi_objective
    value_cols = [f"value_{t}" for t in task_names] if multi else ["value"]
    attr_cols = ["role", "fail_reason", "reused_from", "items"]
    timing_cols = ["setup", "merge", "eval", "total", "worker"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["number", "state", *value_cols, *[f"search_{t}" for t in task_names], "duration_s",
                     *attr_cols, *[f"t_{c}" if c != "worker" else c for c in timing_cols], *param_names])
    for t in trials:
        values = list(t.values) if t.values is not None else [None] * len(value_cols)
        tasks = t.user_attrs.get("tasks") or {}
        duration = t.duration.total_seconds() if t.duration is not None else None
        attrs = [t.user_attrs.get(a) for a in attr_cols]
        if attrs[1]:
            attrs[1] = str(attrs[1]).splitlines()[0]
        timings = t.user_attrs.get("timings") or {}
        writer.writerow([t.number, t.state.name, *values, *[tasks.get(n) for n in task_names], duration,
                         *attrs, *[timings.get(c) for c in timing_cols], *[t.params.get(p) for p in param_names]])
    return buf.getvalue()


def report_md(result, storage: str, plots: list[str], ev: dict | None = None) -> str:
    """report.md: the run at a glance, the candidates on every split, the evidence, the winner's recipe,
    failed trials, plots, and how to explore the study."""
    from optuna.trial import TrialState

    study, w = result.study, result.winner
    out = _overview(result) + _candidates_table(result)
    if ev:
        from evomerge.search.evidence import markdown

        out += markdown(ev)
    if w is not None:
        out += ["## Winner recipe", "", "```yaml", w.recipe.to_yaml().rstrip(), "```", ""]
    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))]
    if failed:
        out += ["## Failed trials", ""]
        for t in failed[:20]:
            reason = str(t.user_attrs.get("fail_reason", "interrupted")).splitlines()[0]
            out.append(f"- trial {t.number}: {reason}")
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    out += ["## Explore the study", "", "```", DASHBOARD_HINT.format(storage=storage), "```", ""]
    out += ["Files: `best.yaml` (winner, mergekit YAML), `trials.csv` (every trial), `study.db` (Optuna storage)."]
    return "\n".join(out) + "\n"


def _overview(result) -> list[str]:
    """The report's head: trials by state, objective, fitness, splits, wall time, protocol, winner."""
    space, study, w = result.space, result.study, result.winner
    states = {s: 0 for s in ("COMPLETE", "PRUNED", "FAIL")}
    reused = 0
    for t in study.get_trials(deepcopy=False):
        if t.state.name in states:
            states[t.state.name] += 1
        reused += "reused_from" in t.user_attrs
    out = [f"# evomerge search: {space.name}", ""]
    out.append(f"- trials: {states['COMPLETE']} complete"
               + (f" ({reused} reused the score of an identical, earlier recipe)" if reused else "")
               + f", {states['PRUNED']} pruned, {states['FAIL']} failed"
               f" (budget {space.budget.trials}); sampler {study.user_attrs.get('sampler')}, seed {space.budget.seed}")
    out.append("- objective: " + ", ".join(f"{t.task}/{t.metric} x{t.weight:g} ({t.direction})"
                                          for t in space.objective.tasks)
               + (" (multi-objective)" if space.objective.multi_objective else ""))
    out.append("- fitness: " + fitness_text(study, space))
    out.append("- splits: " + splits_text(space) + (f"; search limit {space.budget.limit}" if space.budget.limit else "")
               + f"; select: top {space.budget.top_k} + baselines; report: winner, baselines, parents")
    out.append(f"- wall time: {wall_text(result.info.get('wall') or {}, result.seconds)}")
    out += [f"- {line}" for line in protocol_lines(*stored(study))]
    if w is not None:
        out.append(f"- winner: **{w.label}** -> `best.yaml` (`evomerge merge best.yaml OUT` rebuilds it)")
    out.append("")
    return out


def _candidates_table(result) -> list[str]:
    """Every candidate's score on each split and its report score per task."""
    space, w = result.space, result.winner
    out = ["## Winner vs parents vs baselines", ""]
    task_names = [t.task for t in space.objective.tasks]
    splits = list(ROLES)
    header = ["candidate"] + splits + [f"report: {t}" for t in task_names]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for c in result.candidates:
        row = [c.label + (" (winner)" if c is w else "")]
        row += [_fmt((c.scores.get(s) or {}).get("score")) for s in splits]
        rep = (c.scores.get("report") or {}).get("tasks") or {}
        row += [_fmt(rep.get(t)) for t in task_names]
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    out.append("Scores are the weighted objective (higher is better). Parents are scored on the report split only.")
    out += _same_answers(result.candidates)
    out.append("")
    return out


def _same_answers(candidates) -> list[str]:
    """A note for candidates that scored the same on every report item: the same model, or nearly
    (slerp interpolates linearly between nearly parallel tensors, which fine-tunes of one base are)."""
    groups: dict[str, list[str]] = {}
    for c in candidates:
        items = (c.scores.get("report") or {}).get("items")
        if items:
            groups.setdefault(json.dumps(items, sort_keys=True), []).append(c.label)
    notes = []
    for labels in (g for g in groups.values() if len(g) > 1):
        why = (" slerp falls back to linear interpolation where two tensors point almost the same way (as "
               "fine-tunes of one base mostly do), so slerp at t = 0.5 and the uniform average are nearly one model."
               if any("slerp" in x for x in labels) and any("linear" in x for x in labels) else
               " Their recipes give the same, or nearly the same, model.")
        notes.append(f"- {', '.join(labels)}: the same score on every report item.{why}")
    return [""] + notes if notes else []


def fitness_text(study, space) -> str:
    """How the search scored its trials, and the item evaluations it spent (against every trial on the
    full limit)."""
    from evomerge.search.fitness import ANCHORS_ATTR, ITEMS_ATTR

    b = space.budget
    mode = b.fitness_mode
    trials = [t for t in study.get_trials(deepcopy=False) if ITEMS_ATTR in t.user_attrs]
    spent = sum(int(t.user_attrs[ITEMS_ATTR]) for t in trials)
    plan = study.user_attrs.get(ANCHORS_ATTR) or {}
    spent += int(plan.get("reference_items", 0))
    per_trial = max((int(t.user_attrs[ITEMS_ATTR]) for t in trials), default=0)
    if mode == "fidelity":
        how = f"fidelity (rungs from {b.fidelity.limit} items per task, x{b.fidelity.factor}, pruner {b.pruner})"
        full = max(per_trial, 1) * len(trials)
    elif mode == "anchors":
        n = sum(len(p["picks"]) for p in plan.get("tasks", {}).values())
        how = (f"anchors ({n} anchor items, {b.anchor_items} per task, chosen from {len(plan.get('references', []))} "
               f"references scored on {plan.get('reference_items', 0)} items)")
        full = int(plan.get("reference_items", 0)) // max(len(plan.get("references", [])), 1) * len(trials)
    else:
        return f"full (every item of the search limit); {spent} item evaluations"
    return f"{how}; {spent} item evaluations, against {full} for every trial on the full limit"


def summary(result) -> str:
    """The table printed at the end of `evomerge search`."""
    space = result.space
    lines = []
    info = result.info
    reused = f" ({info['reused']} reused the score of an identical recipe)" if info.get("reused") else ""
    invalid = f" ({info['invalid']} not a valid recipe, no merge)" if info.get("invalid") else ""
    lines.append(f"search {space.name}: {info.get('completed', 0)} completed{reused}, {info.get('failed', 0)} failed"
                 f"{invalid}, "
                 f"{info.get('pruned', 0)} pruned this run; {wall_text(info.get('wall') or {}, result.seconds)}")
    splits = list(ROLES)
    width = max([len(c.label) + 9 for c in result.candidates] + [20])
    lines.append(f"{'candidate':<{width}}" + "".join(f"{s:>10}" for s in splits))
    for c in result.candidates:
        label = c.label + (" (winner)" if c is result.winner else "")
        lines.append(f"{label:<{width}}" + "".join(f"{_fmt((c.scores.get(s) or {}).get('score')):>10}" for s in splits))
    lines.append(f"wrote {result.out}/best.yaml, trials.csv, report.md")
    return "\n".join(lines)


def write_run(result, *, storage: str, evidence: bool = True) -> None:
    """Write best.yaml, trials.csv, report.md and plots into the run folder (each atomically)."""
    out = Path(result.out)
    space = result.space
    atomic_write(out / "trials.csv", trials_csv(result.study, space))
    from evomerge.search.evidence import compute

    audit = {k: v for k, v in result.study.user_attrs.get("parent_audit", {}).items() if not k.startswith("_")}
    ev = compute(result.candidates, result.winner, space.objective, parents=audit or None) if evidence else None
    if ev is not None:
        atomic_write(out / "evidence.json", json.dumps(ev, indent=1) + "\n")  # in report order: winner first
    from evomerge.search.plots import write_plots

    plots = write_plots(result, out, ev)
    if result.winner is not None:
        paths = [m.path for m in space.models] + ([space.base.path] if space.base else [])
        hashes = source_hashes(list(dict.fromkeys(paths)), out / "sources.json")
        atomic_write(out / "best.yaml", best_yaml(result, storage, hashes))
    atomic_write(out / "report.md", report_md(result, storage, plots, ev))
    record, report_log = stored(result.study)
    record = {"space": space.name, "record": record, "report_evaluations": report_log,
              "hub_sources": {path: {"repo": o.repo, "commit": o.commit} for path, o in
                              hub_sources([m.path for m in space.models] + ([space.base.path] if space.base else [])
                                          ).items()}}
    atomic_write(out / "record.json", json.dumps(record, indent=1, sort_keys=True) + "\n")
