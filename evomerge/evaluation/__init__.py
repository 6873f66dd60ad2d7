"""Scoring a live model: lm-eval run in memory on the resident model a trial merged into.

What it holds: `evaluate.py` (`LMEvalEvaluator`: tasks built once per split, `HFLM` wrapped around
the model once, seeded item subsets). Split carving, audits and statistics land here too.

What it may import: `evomerge.errors`, `evomerge.engine`, and lm-eval / transformers (lazily, inside
the functions that need them); nothing from `search`, `executors` or `toy`
(tests/test_architecture.py). Importing it does not import lm_eval or torch.

Public API: `from evomerge.evaluation import LMEvalEvaluator, EvalResult, Evaluator`.
"""

from evomerge.evaluation.evaluate import EvalResult, Evaluator, LMEvalEvaluator

__all__ = ["EvalResult", "Evaluator", "LMEvalEvaluator"]
