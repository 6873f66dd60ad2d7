"""What a search may change and how it runs: `evomerge search`.

What it holds, in the order of a run: the space (`space.py`: the frozen SearchSpace, owner of the
parameter names; `spacefile.py`: space.yaml's schema and loading; `methods.py`: each method's tunables
as the space sets them; `models.py`: the space's model folders), the seam to Optuna (`suggest.py`:
the only caller of `trial.suggest_*`, and `build_recipe(space, params)`, the pure step from Optuna's
flat params to a mergekit recipe), `study.py` (sampler, storage, pruner, resume), `preflight.py`
(every check before anything is written), `run.py` (one run, start to end, with `options.py`'s
RunOptions), `loop.py` (the trial loop: ask, suggest, build, submit, tell; FAIL trials), `fitness.py`
and `score.py` (what a trial's value is), `selection.py` (select and report, with `candidates.py`,
`naive.py` and `parents.py`), `jobs.py` and `progress.py` (jobs through the executor, the bar),
`record.py`, `evidence.py` and `report.py` (the run record, the report's statistics, the run folder),
and the commands `evomerge eval` (`comparison.py`) and `evomerge audit` (`audit.py`).

What it may import: every room below it (`executors`, `evaluation`, `moe`, `engine`, `toy`, `errors`);
nothing imports `search` but the CLI (tests/test_architecture.py). Optuna is imported here and
nowhere else; importing this package does not import optuna, torch or lm_eval.

Public API: `from evomerge.search import load_space, suggest_params, build_recipe, run_search`.
"""

from evomerge.search.run import run_search
from evomerge.search.space import SearchSpace
from evomerge.search.spacefile import load_space
from evomerge.search.suggest import build_recipe, suggest_params

__all__ = ["SearchSpace", "build_recipe", "load_space", "run_search", "suggest_params"]
