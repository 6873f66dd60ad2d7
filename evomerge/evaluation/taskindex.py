"""A cheap look at lm-eval's built-in tasks: is a name written in any of their YAML files at all?

Why it exists: lm-eval's `TaskManager` parses every one of its ~14,000 task YAML files before it can say
that a task does not exist (8 to 16 s on an idle 2-core machine, over a minute on a busy one). Reading
the same files as plain text takes about a second. A name that appears in none of them, as a whole word,
cannot be a built-in task, group or tag, so a typo is refused at once with a suggestion from the names
the files declare (`task:`, `group:`, `tag:` lines). Any name that does appear is left to lm-eval.
`evaluate.LMEvalEvaluator` asks before it indexes the built-in tasks.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

_DECLARED = re.compile(r"^\s*-?\s*(?:task|group|tag):\s*['\"]?([\w.\-]+)", re.M)


@functools.cache
def _builtin_text() -> tuple[str, tuple[str, ...]]:
    """All of lm-eval's task YAML as one text, and the names its files declare."""
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    texts, names = [], set()
    for path in root.rglob("*.yaml"):
        try:
            text = path.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        texts.append(text)
        names.update(_DECLARED.findall(text))
    return "\n".join(texts), tuple(sorted(names))


def surely_unknown(names: list[str]) -> tuple[str, str | None] | None:
    """(the first name that no built-in task YAML mentions, the closest declared name or None), or None
    when every name is mentioned somewhere (then only lm-eval's own index can tell)."""
    import difflib

    text, declared = _builtin_text()
    for name in names:
        if not re.search(rf"(?<![\w.\-]){re.escape(name)}(?![\w.\-])", text):
            close = difflib.get_close_matches(name, declared, n=1)
            return name, close[0] if close else None
    return None
