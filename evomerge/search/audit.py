"""`evomerge audit RUN_DIR`: a finished run's evidence again, and whether it kept its own protocol.

Why it exists: a reader of a result (a reviewer, a colleague, the author months later) should not have
to trust report.md. This reads what the run stored (the study's frozen record, the log of report-split
evaluations, the per-item report scores, the parent audit) and prints it: how the splits were made
and the hash of every split's items, the overlap audit and benchmark lint, the parents' lineage and
membership scores, the intervals and paired tests, the protocol. It recomputes the statistics from the
stored per-item scores, so they do not depend on report.md. It exits 1 when the run broke its protocol:
the report split was evaluated more than once, trials were added after it, or the stored evidence
does not match the per-item scores; 0 otherwise; 2 for a folder that is not a run.
"""

from __future__ import annotations

import json
from pathlib import Path

from evomerge.errors import ConfigError, user_errors


def audit_run(run_dir: str | Path) -> tuple[str, list[str]]:
    """(the audit as text, the protocol breaches found)."""
    import optuna

    from evomerge.evaluation import stats
    from evomerge.search.evidence import markdown
    from evomerge.search.record import protocol_lines, stored
    from evomerge.search.study import load_run_study

    run = Path(run_dir)
    db = run / "study.db"
    if not db.is_file():
        raise ConfigError("not an evomerge run folder (no study.db)", where=str(run),
                          fix="give the --out folder of a finished `evomerge search`")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    damaged = dict(fix="the run folder is damaged: restore it, or run the search again into a new --out")
    with user_errors(where=str(db), what="cannot read the run's study: ", **damaged):
        study = load_run_study(f"sqlite:///{db}")
        record, report_log = stored(study)
    breaches: list[str] = []
    lines = [f"# evomerge audit: {run}", ""]
    lines += ["## Protocol, splits and items", ""] + [f"- {x}" for x in protocol_lines(record, report_log)] + [""]
    if record is None:
        breaches.append("the study holds no protocol record (made before evomerge froze one, or not by evomerge)")
    if len(report_log) > 1:
        breaches.append(f"the report split was evaluated {len(report_log)} times (once is the protocol)")
    if report_log and "trials" in report_log[0]:
        n = len(study.get_trials(deepcopy=False))
        if n > report_log[0]["trials"]:
            breaches.append(f"{n - report_log[0]['trials']} trial(s) ran after the report split was first evaluated")
    cache = study.user_attrs.get("report_scores", {})
    ev_path = run / "evidence.json"
    with user_errors(where=str(ev_path), what="cannot read the run's evidence: ", also=(ValueError, OSError),
                     **damaged):
        ev = json.loads(ev_path.read_text(encoding="utf-8")) if ev_path.is_file() else None
    if ev is not None and not (isinstance(ev, dict) and isinstance(ev.get("models", {}), dict)):
        raise ConfigError("evidence.json is not the evidence a run writes", where=str(ev_path), **damaged)
    if ev:
        lines += markdown(ev)
        stored_items = next((v["items"] for v in cache.values() if isinstance(v, dict) and v.get("items")), {})
        weights = ev.get("weights") or {t: 1.0 for t in stored_items}  # runs before weights were stored: equal
        for label, m in ev.get("models", {}).items():
            entry = cache.get(label) or {}
            items = entry.get("items")
            if not items:
                breaches.append(f"{label}: no per-item report scores stored")
                continue
            point = stats.mixture(items, weights) if weights else None
            if point is None or abs(point - m["report"]["point"]) > 1e-9:
                breaches.append(f"{label}: evidence.json says {m['report']['point']:.6f}, the stored items give "
                                f"{point if point is None else round(point, 6)}")
    else:
        lines += ["(no evidence.json: the run has no report yet)", ""]
    lines += ["## Verdict", ""]
    lines += [f"- BROKEN: {b}" for b in breaches] or ["- the run kept its protocol: one look at the report split, "
                                                     "nothing searched after it, evidence matches the stored items"]
    return "\n".join(lines) + "\n", breaches


__all__ = ["audit_run"]
