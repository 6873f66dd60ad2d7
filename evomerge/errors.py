"""User-facing errors.

Every mistake a user can make (a typo in a YAML key, a missing checkpoint, a density of 1.5) raises an
`EvomergeError` *before* heavy work starts. The message says what is wrong, where (a YAML field path or
a file), and how to fix it. The CLI turns these into one line on stderr and exit code 2. Where a library
reads the user's input (lm-eval a task file, SQLAlchemy a storage URL, jinja2 a chat template), its own
exceptions are turned into such errors at that one place by `user_errors`. Anything else is a bug: the
CLI saves its traceback to a file and asks for a report.
"""

from __future__ import annotations

import contextlib


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


# Libraries whose exceptions, raised while they read something the user gave (a task file, a storage URL,
# a run folder, a chat template), are about that input, not about evomerge: `user_errors` turns them
# into a ConfigError that names the field. Matched by the module an exception class comes from, so this
# module imports none of them.
FOREIGN = ("lm_eval", "datasets", "pyarrow", "sqlalchemy", "sqlite3", "optuna", "numpy", "torch", "jinja2",
           "transformers", "tokenizers", "safetensors", "json", "yaml")


def _from_foreign_library(exc: BaseException) -> bool:
    return any(cls.__module__.split(".")[0] in FOREIGN for cls in type(exc).__mro__[:-1]
               if cls.__module__ != "builtins")


def describe(exc: BaseException) -> str:
    """One line about an exception: its own first line, and its direct cause's when it has one (datasets
    says 'An error occurred while generating the dataset'; its cause names the bad row)."""
    def line(e: BaseException) -> str:
        if type(e) is StopIteration:  # a reader that ran out before its first item
            return "no item was read (is the file empty?)"
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__

    cause = exc.__cause__ or exc.__context__
    return line(exc) if cause is None else f"{line(exc)} ({line(cause)})"


@contextlib.contextmanager
def user_errors(where: str, fix: str, *, what: str = "", also: tuple[type[BaseException], ...] = ()):
    """Inside this block, an exception from a library reading the user's input (see FOREIGN), or one of
    the types in `also`, becomes `ConfigError(what + its description, where=where, fix=fix)`. An
    EvomergeError passes through; anything else is a bug and propagates as it is."""
    try:
        yield
    except EvomergeError:
        raise
    except Exception as exc:  # noqa: BLE001 - narrowed just below
        if not (_from_foreign_library(exc) or isinstance(exc, also)):
            raise
        raise ConfigError(f"{what}{describe(exc)}", where=where, fix=fix) from exc
