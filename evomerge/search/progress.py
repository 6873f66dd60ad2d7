"""The progress display of every long phase: done / total, best so far, elapsed, ETA.

Why it exists: the pre-flight, the trials, the naive merges, the candidates scored on select and report,
the membership audit and `evomerge eval` all show the same display (one tqdm bar at a time on stderr,
or nothing with --no-progress); one class keeps them alike.
"""

from __future__ import annotations

import sys


class Progress:
    """tqdm bar (done / total, best so far, elapsed, ETA), or nothing: the trials, then the candidates
    scored on select and report."""

    def __init__(self, enabled: bool, total: int, initial: int, *, desc: str = "search", unit: str = "trial"):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                            dynamic_ncols=True, smoothing=0.1)

    def update(self, best: float | None, failed: int) -> None:
        if self.bar is not None:
            post = {"best": "-" if best is None else f"{best:.4f}"}
            if failed:
                post["failed"] = failed
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def step(self, what: str | None = None) -> None:
        """One step done; `what` names the next one (the pre-flight's stages, eval's models)."""
        if self.bar is not None:
            if what is not None:
                self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)

    def name(self, what: str) -> None:
        """Name the step now running, without counting one."""
        if self.bar is not None:
            self.bar.set_postfix_str(what)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
