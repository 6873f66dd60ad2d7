"""The files that decide a task's scores, hashed: its YAML, the YAML it includes, its local data.

Why it exists: the run record (`search/record.py`) freezes what the items were; a changed prompt in
a shared include or an edited data file must show up as a changed hash on resume and in the audit.
`evaluate.LMEvalEvaluator.record` calls `task_files` per task.
"""

from __future__ import annotations

import os


def _yaml_chain(path: str) -> list[str]:
    """A task YAML and the files it `include:`s (relative to it), transitively: the settings that
    decide a score may sit in a shared include (the toy tasks' generation settings do)."""
    import re

    out, todo = [], [path]
    while todo:
        f = todo.pop()
        if f in out or not os.path.isfile(f):
            continue
        out.append(f)
        with open(f, encoding="utf-8") as fh:
            for inc in re.findall(r"^include:\s*['\"]?([^'\"#\s]+)", fh.read(), flags=re.M):
                todo.append(inc if os.path.isabs(inc) else os.path.join(os.path.dirname(f), inc))
    return out


def task_files(manager, name: str, task) -> dict[str, str]:
    """sha256 of the task's YAML file, the YAML files it includes, and its local data files."""
    import hashlib

    files = []
    entry = getattr(manager, "task_index", {}).get(name) if manager is not None else None
    yaml_path = getattr(entry, "yaml_path", None) if entry is not None else None
    if yaml_path:
        files += _yaml_chain(str(yaml_path))
    kwargs = getattr(task.config, "dataset_kwargs", None) or {}
    base = os.path.dirname(str(yaml_path)) if yaml_path else "."
    for key in ("data_files", "data_file", "data_dir"):
        value = kwargs.get(key)
        values = value.values() if isinstance(value, dict) else ([value] if isinstance(value, str) else value or [])
        for v in values:
            for f in ([v] if isinstance(v, str) else v):
                # HF datasets reads relative paths from the current folder; some loaders from the YAML's
                f = next((c for c in (f, os.path.join(base, f)) if os.path.isfile(c)), None)
                if f is not None:
                    files.append(f)
    out = {}
    for f in files:
        with open(f, "rb") as fh:
            out[os.path.basename(f)] = hashlib.sha256(fh.read()).hexdigest()[:16]
    return out
