"""Where a run's wall time went: the pre-flight, the trials, and select + report, kept in the study.

Why it exists: a user reads the time of a run in report.md and in the summary line, and should read the
time the run took, not the time of the last command: resuming a finished run only shows its result (a
second), and must not overwrite the minutes the search took. `StageClock` times the stages of one
`run.run_search` call and adds them to the study's totals (`WALL_ATTR`) when that call did any work.
"""

from __future__ import annotations

import contextlib
import time

WALL_ATTR = "wall_seconds"  # study user attr: {stage: seconds summed over the invocations that worked, "invocations": n}
STAGES = ("preflight", "trials", "select_report")


class StageClock:
    """Seconds per stage of this invocation, and the invocation's total."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def total(self) -> float:
        return time.perf_counter() - self.t0

    def store(self, study, *, worked: bool) -> dict:
        """Add this invocation to the study's totals when it did work (ran or scored anything); returns
        the totals."""
        wall = dict(study.user_attrs.get(WALL_ATTR) or {})
        if worked:
            for stage in STAGES:
                wall[stage] = round(wall.get(stage, 0.0) + self.seconds.get(stage, 0.0), 2)
            wall["invocations"] = int(wall.get("invocations", 0)) + 1
            study.set_user_attr(WALL_ATTR, wall)
        return wall


def wall_text(wall: dict, this: float) -> str:
    """'66.7 s (pre-flight 9.1 s, trials 18.5 s, select and report 39.1 s); this invocation 1.2 s'."""
    if not wall.get("invocations"):
        return f"{this:.1f} s"
    total = sum(wall.get(s, 0.0) for s in STAGES)
    over = f" over {wall['invocations']} invocations" if wall["invocations"] > 1 else ""
    return (f"{total:.1f} s{over} (pre-flight {wall.get('preflight', 0):.1f} s, trials {wall.get('trials', 0):.1f} s, "
            f"select and report {wall.get('select_report', 0):.1f} s); this invocation {this:.1f} s")
