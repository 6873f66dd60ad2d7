"""The search's progress bar: trials done / budget, best so far, elapsed, ETA; then the candidates.

Why it exists: the trial loop and the scoring of candidates on the select and report splits show the
same display (tqdm on stderr, or nothing with --no-progress); one class keeps them alike.
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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
