"""Scoring a live model: lm-eval run in memory on the resident model a trial merged into.

What it holds: `evaluate.py` (`LMEvalEvaluator`: tasks built once, `HFLM` wrapped around the model
once, the protocol applied), `subsets.py` (the seeded item subsets a call scores), `results.py`
(lm-eval's output as rows), `taskfiles.py` (hashes of a task's files), `splits.py` (carving a task's
documents into search/select/report by keyed content hash) and `protocol.py` (the scoring protocol and
the split rule, pydantic). Audits and statistics land here too (`stats.py`, `overlap.py`,
`benchmarks.py`, `membership.py`).

What it may import: `evomerge.errors`, `evomerge.engine`, and lm-eval / transformers (lazily, inside
the functions that need them); nothing from `search`, `executors` or `toy`
(tests/test_architecture.py). Importing it does not import lm_eval or torch.

Public API: `from evomerge.evaluation import LMEvalEvaluator, EvalResult, Evaluator`.
"""

from evomerge.evaluation.evaluate import EvalResult, Evaluator, LMEvalEvaluator

__all__ = ["EvalResult", "Evaluator", "LMEvalEvaluator"]
