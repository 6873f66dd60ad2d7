"""The run record: under which protocol, on which items, and when the report split was touched.

Why it exists: a researcher must be able to say what a run's numbers mean. Before the study exists,
`protocol_record` freezes everything that decides a score besides the recipe: the scoring protocol
(few-shot count, chat template, system instruction, generation settings, batch size), the split rule,
the dtype, the lm-eval version, and per task and split the item count, a hash of the items and hashes
of the task files. It is stored in the study; a resume under anything else is refused by `check_resume`
with the names of what changed. `note_report` logs every evaluation of the report split (it should
happen once); `protocol_lines` is the same record as text for best.yaml's comments and report.md.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from evomerge.errors import ConfigError
from evomerge.evaluation.protocol import differences

RECORD_ATTR = "protocol_record"  # study user attr: the frozen record
REPORT_LOG_ATTR = "report_evaluations"  # study user attr: [{"at": iso time, "candidates": [...]}]


def protocol_record(space, evaluator: Any = None) -> dict:
    """The frozen record of how this space's candidates are scored (`evaluator`: the built
    LMEvalEvaluator, for the item hashes; a plug-in evaluator without `record()` gives none)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        lm_eval_version = version("lm_eval")
    except PackageNotFoundError:  # pragma: no cover - lm-eval is a dependency
        lm_eval_version = "absent"
    obj = space.objective
    items = evaluator.record() if hasattr(evaluator, "record") else None
    return {
        "protocol": obj.protocol.model_dump(mode="json"),
        "splits": obj.splits.model_dump(mode="json"),
        "dtype": space.dtype,
        "score_dtype": space.score_dtype,
        "lm_eval": lm_eval_version,
        "items": items,
    }


def check_resume(stored: dict | None, current: dict, where: str) -> None:
    """Refuse to resume a study that was scored under another protocol or on other items."""
    if stored is None:
        return
    # the settings first, then the items they led to (a new carving changes every item hash)
    skip = ("items", "audit")  # the audit's findings are reported, not compared
    changed = differences({k: v for k, v in stored.items() if k not in skip},
                          {k: v for k, v in current.items() if k not in skip})
    changed += differences({"items": stored.get("items")}, {"items": current.get("items")})
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise ConfigError(
            f"this run was scored under another protocol or on other items ({shown})",
            where=where,
            fix="restore the space's objective (tasks, splits, protocol, dtype) and task files, "
                "or start a new run with another --out",
        )


def note_report(study, labels: list[str]) -> list[dict]:
    """Log one evaluation of the report split (who was scored, when); returns the whole log."""
    log = list(study.user_attrs.get(REPORT_LOG_ATTR, []))
    log.append({"at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "candidates": labels,
                "trials": len(study.get_trials(deepcopy=False))})  # trials so far: none may follow
    study.set_user_attr(REPORT_LOG_ATTR, log)
    return log


def stored(study) -> tuple[dict | None, list[dict]]:
    """The record and the report log kept in a study."""
    return study.user_attrs.get(RECORD_ATTR), list(study.user_attrs.get(REPORT_LOG_ATTR, []))


def splits_text(space) -> str:
    """One line saying how the splits are made."""
    sp = space.objective.splits
    if sp.mode == "named":
        return "tasks already split: " + ", ".join(f"{r} `<task>_{n}`" for r, n in sp.names.items())
    f = sp.fractions
    return f"carved by content hash (seed {sp.seed}): search {f.search:g}, select {f.select:g}, report {f.report:g}"


def protocol_lines(record: dict | None, report_log: list[dict] | None = None) -> list[str]:
    """The record as short text lines (best.yaml comments, report.md)."""
    lines = _record_lines(record) if record else []
    if report_log is not None:
        when = ", ".join(e["at"] for e in report_log) or "not yet"
        lines.append(f"report split evaluated {len(report_log)} time(s): {when}")
        if len(report_log) > 1:
            lines.append(f"WARNING: the report split was looked at {len(report_log)} times (--reopen-report); "
                         "its scores are no longer one held-out look")
    return lines


def audit_lines(record: dict | None) -> list[str]:
    """The benchmark lint and the overlap audit as text lines (WARNING lines when something was allowed)."""
    audit = (record or {}).get("audit")
    if not audit:
        return []
    lines = []
    if audit.get("public_benchmarks"):
        names = ", ".join(f"{t} ({fam})" for t, fam in audit["public_benchmarks"])
        lines.append(f"WARNING: searched on public benchmark test sets ({names}), allowed by "
                     "--allow-public-benchmark-contamination: these scores may be contaminated")
    ov = audit.get("overlap")
    if ov:
        if ov["n_found"]:
            lines.append(f"WARNING: the overlap audit found {ov['n_found']} duplicate or near-duplicate item pair(s) "
                         f"across splits or tasks, allowed by --allow-overlap (first: {ov['found'][0]['a']} ~ "
                         f"{ov['found'][0]['b']})")
        else:
            lines.append(f"overlap audit: {ov['items']} items, no duplicate or near-duplicate ({ov['ngram']}-word runs) "
                         "across splits or tasks")
    return lines


def _record_lines(record: dict) -> list[str]:
    p = record["protocol"]
    lines = [
        f"protocol: num_fewshot {p['num_fewshot']}, apply_chat_template {p['apply_chat_template']}, "
        f"fewshot_as_multiturn {p['fewshot_as_multiturn']}, system_instruction {p['system_instruction']!r}, "
        f"gen_kwargs {p['gen_kwargs'] or '{}'}, batch_size {p['batch_size']}",
        f"scored in {record['score_dtype']} (merged in {record['dtype']}), lm-eval {record['lm_eval']}",
    ]
    for task, row in (record.get("items") or {}).items():
        parts = [f"{role} {s['items']} ({s['ids']})" for role, s in row["splits"].items()]
        files = ", ".join(f"{k} {v}" for k, v in row.get("files", {}).items())
        lines.append(f"items {task}: " + ", ".join(parts) + f"; few-shot from {row['fewshot_source']}"
                     + (f"; files {files}" if files else ""))
    return lines + audit_lines(record)
