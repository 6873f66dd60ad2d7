"""Hang guards for tests: limits that stop a test that hangs, never one that runs on a slow machine.

A base figure is what a step takes on an idle 2-core machine; `hang_guard` allows EVOMERGE_TEST_SLOWDOWN
times that (10 by default: CI machines are loaded, and two torch threads on a busy machine can be ten
times slower). Where a step reports progress (trials finishing), `wait_while_progressing` waits as long
as it moves, whatever the machine's speed.
"""

from __future__ import annotations

import os
import time

SLOWDOWN = float(os.environ.get("EVOMERGE_TEST_SLOWDOWN", "10"))


def hang_guard(seconds: float) -> float:
    """A timeout for a step that takes about `seconds` on an idle machine."""
    return seconds * SLOWDOWN


def wait_while_progressing(proc, progress, *, stall: float, poll: float = 0.5) -> int:
    """Wait for a subprocess as long as `progress()` (e.g. trials finished) keeps changing: it fails only
    when nothing moved for `stall` seconds, whatever the machine's speed. Returns the exit code."""
    last, since = progress(), time.monotonic()
    while proc.poll() is None:
        time.sleep(poll)
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall:
            proc.kill()
            raise AssertionError(f"no progress for {stall:.0f} s (stuck at {last!r})")
    return proc.returncode
