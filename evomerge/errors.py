"""User-facing errors.

Every mistake a user can make (a typo in a YAML key, a missing checkpoint, a density of 1.5) raises an
`EvomergeError` *before* heavy work starts. The message says what is wrong, where (a YAML field path or
a file), and how to fix it. The CLI turns these into one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EvomergeError(Exception):
    """A user error: bad input, not a bug. Rendered as 'where: what. Fix: fix'."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        if self.fix:
            text = f"{text.rstrip('.')}. Fix: {self.fix}"
        return text


class ConfigError(EvomergeError):
    """A YAML file (merge recipe or search space) is malformed or names something invalid."""


class CheckpointError(EvomergeError):
    """Source checkpoints are missing, unreadable, or disagree (architecture, shapes, vocab)."""


class OutputError(EvomergeError):
    """The output location cannot be used (exists and is not empty, not writable)."""


class ConfigWarning(UserWarning):
    """A key or value that has no effect (mergekit ignores it too): the CLI prints one line per warning.

    Raised with `warnings.warn(ConfigWarning(text))`; `evomerge.cli` shows it as `evomerge: warning: text`."""
