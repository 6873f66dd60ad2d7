"""What a search may change and how it runs: `evomerge search`.

What it holds: `space.py` (load and validate space.yaml; owns parameter names), `suggest.py` (the only
caller of `trial.suggest_*`; `build_recipe(space, params)` is the pure seam from Optuna's flat params
to a mergekit recipe), `study.py` (sampler, storage, pruner, resume), `score.py` (objectives, the task
mixture), `loop.py` (ask, suggest, build, submit, tell; FAIL trials; select and report) and
`report.py` (best.yaml, trials.csv, report.md, plots).

What it may import: every room below it (`executors`, `evaluation`, `engine`, `toy`, `errors`);
nothing imports `search` but the CLI (tests/test_architecture.py). Optuna is imported here and
nowhere else; importing this package does not import optuna, torch or lm_eval.

Public API: `from evomerge.search import load_space, suggest_params, build_recipe, run_search`.
"""

from evomerge.search.loop import run_search
from evomerge.search.space import SearchSpace, load_space
from evomerge.search.suggest import build_recipe, suggest_params

__all__ = ["SearchSpace", "build_recipe", "load_space", "run_search", "suggest_params"]
