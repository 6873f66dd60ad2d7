"""Tests for `evomerge/executors/sigint.py`: a Ctrl-C whose KeyboardInterrupt a library swallows is still
delivered by `check()`; everything else about SIGINT stays as it was."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from evomerge.executors.sigint import SigintLatch


def _ctrl_c_swallowed() -> None:
    """Ctrl-C lands inside code that drops the exception (as a callback Ray's core runs does)."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs at one of these bytecodes
            pass
    except KeyboardInterrupt:
        pass


def test_a_swallowed_ctrl_c_is_raised_by_check_and_only_once():
    latch = SigintLatch().install()
    try:
        _ctrl_c_swallowed()
        with pytest.raises(KeyboardInterrupt):
            latch.check()
        latch.check()  # delivered once; nothing pending now
    finally:
        latch.uninstall()


def test_the_previous_handler_still_runs_first_and_is_restored():
    calls = []

    def handler(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        latch = SigintLatch().install()
        assert signal.getsignal(signal.SIGINT) == latch._handle
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            pass
        assert calls == [signal.SIGINT] and latch.pending
        latch.uninstall()
        assert signal.getsignal(signal.SIGINT) is handler
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            pass
        assert calls == [signal.SIGINT, signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_without_ctrl_c_check_is_silent_and_default_handling_is_back_after_uninstall():
    latch = SigintLatch().install()
    latch.check()
    latch.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            pass


def test_an_ignored_sigint_stays_ignored_and_other_threads_are_left_alone():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        latch = SigintLatch().install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
        latch.check()  # nothing was caught
        latch.uninstall()
    finally:
        signal.signal(signal.SIGINT, previous)
    result = []
    thread = threading.Thread(target=lambda: result.append(SigintLatch().install()._installed))
    thread.start()
    thread.join()
    assert result == [False] and signal.getsignal(signal.SIGINT) is previous
