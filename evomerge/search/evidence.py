"""The evidence a run's report carries: intervals, paired tests, the overfitting drop, truncation.

Why it exists: a researcher must be able to publish a search's result. From the report split's
per-item scores (scored once, at the end), this computes for every reported model its mixture score
with a bootstrap 95% interval, and for the winner against every other (parents, baselines, naive
merges) the paired difference with its interval, a paired-bootstrap p-value and McNemar's exact test
for 0/1 metrics (`evaluation/stats.py`). It also gives the winner's search -> select -> report scores
(the drop is the winner's curse, the measure of overfitting to the search split) and each model's
truncation rate (the share of generations that reached the length limit, where scores compare
unfinished answers). Plain data in and out, so `report.md`, `evidence.json` and `evomerge audit` show
the same numbers.
"""

from __future__ import annotations

from typing import Any


def compute(candidates: list, winner: Any, objective, parents: dict | None = None) -> dict:
    """`candidates`: candidates.Candidate objects with `scores["report"]["items"]`; `parents`: the parent
    audit (lineage and membership per model, `parents.parent_audit`); returns plain data."""
    from evomerge.evaluation import stats
    from evomerge.search.score import weights as mixture_weights

    w = mixture_weights(objective)
    reported = [c for c in candidates if (c.scores.get("report") or {}).get("items")]
    out: dict[str, Any] = {"models": {}, "paired": {}, "winner": None, "drop": None, "weights": w,
                           "method": f"stratified bootstrap, {stats.BOOTSTRAP_RESAMPLES} resamples, 95%; McNemar "
                                     "exact (binomial) on discordant items for 0/1 metrics"}
    for c in reported:
        rep = c.scores["report"]
        ci = stats.mixture_ci(rep["items"], w)
        out["models"][c.label] = {"report": ci.as_dict(), "items": sum(len(v) for v in rep["items"].values()),
                                  "truncated": rep.get("truncated")}
    if parents:
        out["parents"] = parents
    if winner is None or not (winner.scores.get("report") or {}).get("items"):
        return out
    out["winner"] = winner.label
    base = winner.scores["report"]["items"]
    for c in reported:
        if c is winner:
            continue
        try:
            res = stats.paired(base, c.scores["report"]["items"], w)
        except ValueError as exc:  # different item counts: not comparable item by item
            out["paired"][c.label] = {"error": str(exc)}
            continue
        out["paired"][c.label] = res.as_dict()
    out["drop"] = {split: (winner.scores.get(split) or {}).get("score") for split in ("search", "select", "report")}
    s, r = out["drop"]["search"], out["drop"]["report"]
    out["drop"]["search_minus_report"] = None if s is None or r is None else s - r
    return out


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _p(p: Any) -> str:
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def markdown(ev: dict) -> list[str]:
    """The report.md section."""
    if not ev.get("models"):
        return []
    lines = ["## Evidence: intervals and paired tests (report split)", ""]
    lines.append("| model | report | 95% interval | winner minus model | 95% interval | p (paired bootstrap) | "
                 "p (McNemar) | truncated |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for label, m in ev["models"].items():
        ci = m["report"]
        pair = ev["paired"].get(label) or {}
        d = pair.get("delta") or {}
        trunc = m.get("truncated")
        rate = None if not trunc else sum(trunc.values()) / len(trunc)
        lines.append(f"| {label}{' (winner)' if label == ev.get('winner') else ''} | {_f(ci['point'])} | "
                     f"{_f(ci['low'])} to {_f(ci['high'])} | {_f(d.get('point'))} | "
                     f"{(_f(d.get('low')) + ' to ' + _f(d.get('high'))) if d else '-'} | {_p(pair.get('p_bootstrap'))} "
                     f"| {_p(pair.get('p_mcnemar'))} | {'-' if rate is None else f'{100 * rate:.1f}%'} |")
    lines.append("")
    drop = ev.get("drop")
    if drop:
        lines.append(f"Winner's curse: the winner scored {_f(drop['search'])} on search, {_f(drop['select'])} on "
                     f"select and {_f(drop['report'])} on report (search minus report: "
                     f"{_f(drop['search_minus_report'])}). The report split was never used to choose.")
        lines.append("")
    if ev.get("parents"):
        lines += ["## Parent audit: lineage and membership evidence", ""]
        lines += [f"- {x}" for x in parent_lines(ev["parents"])]
        lines += ["", "Min-K%++ (k 20%) scores each report item by how much likelier the model finds its tokens "
                      "than typical ones; the AUROC against reference items it cannot have seen is evidence, "
                      "not a verdict.", ""]
    lines.append(f"Intervals: {ev['method']}. Truncated: share of generations that reached the token limit "
                 "(max_gen_toks), averaged over the generation tasks.")
    lines.append("")
    return lines


def parent_lines(parents: dict) -> list[str]:
    out = []
    for label, p in parents.items():
        if p.get("lineage") is None:
            text = "the searched merge"
            mem = p.get("membership")
            if mem:
                text += (f"; Min-K%++ AUROC {mem['auroc']:.3f} (report items vs {mem['reference_items']} reference "
                         "items of the same tasks; 0.5 = no sign of having seen them)")
            out.append(f"{label}: {text}")
            continue
        lin = p.get("lineage") or {}
        bits = [f"base_model {lin['base_model']}" if lin.get("base_model") else None,
                "tagged merge" if lin.get("merge") else None,
                f"datasets {', '.join(lin['datasets'])}" if lin.get("datasets") else None]
        text = "; ".join(b for b in bits if b) or "no lineage declared (config.json, README.md)"
        mem = p.get("membership")
        if mem:
            text += (f"; Min-K%++ AUROC {mem['auroc']:.3f} (report items vs {mem['reference_items']} reference items "
                     f"of the same tasks; 0.5 = no sign of having seen them)")
        out.append(f"{label}: {text}")
    return out


__all__ = ["compute", "markdown", "parent_lines"]
