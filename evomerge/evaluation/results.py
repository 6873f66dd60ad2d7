"""lm-eval's output as evomerge's rows: metrics per task, every item's score, every item's prompt.

Why it exists: `lm_eval.evaluator.evaluate` returns nested dictionaries keyed by metric and filter
(`exact_match,none`) with stderr entries beside them, and logged samples per document. The evaluator
(`evaluate.LMEvalEvaluator.evaluate`) turns them into the plain rows of an `EvalResult` here: the
filter suffix `,none` dropped, other filters kept, stderr left out, items in document order.
"""

from __future__ import annotations


def metric_rows(results: dict[str, dict], names: list[str]) -> dict[str, dict[str, float]]:
    """Per task, its numeric metrics (stderr left out; `metric,none` -> `metric`, other filters kept)."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        row: dict[str, float] = {}
        for key, value in results.get(name, {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or "_stderr" in key:
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else key] = float(value)
        out[name] = row
    return out


def item_rows(logged: dict[str, list[dict]], names: list[str], metrics: dict) -> dict[str, dict[str, list[float]]]:
    """Per task and metric, every logged item's score in document order."""
    rows: dict[str, dict[str, list[float]]] = {}
    for name in names:
        docs = sorted(logged[name], key=lambda d: d["doc_id"])
        rows[name] = {m: [float(d[m]) for d in docs] for m in metrics[name] if docs and m in docs[0]}
    return rows


def prompts(logged: dict[str, list[dict]]) -> dict[str, dict[int, list[str]]]:
    """Per task, every logged item's prompt(s) by document index (what the model was shown)."""
    out: dict[str, dict[int, list[str]]] = {}
    for name, docs in logged.items():
        rows = out.setdefault(name, {})
        for d in docs:
            rows[int(d["doc_id"])] = [str(a[0]) if isinstance(a, (list, tuple)) else str(a) for a in d["arguments"]]
    return out
