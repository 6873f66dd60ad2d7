"""The keys of a mergekit recipe as written: typos refused all at once, keys mergekit ignores warned about.

Why it exists: mergekit 0.1.5 reads its YAML with pydantic's default (unknown keys are dropped without a
word), so a misspelt `densty:` merges with the default density. Published configs also carry keys that
mergekit accepts and then ignores: a `revision:` beside `model:`, `weight` on model_stock, `normalize`
on sce, `residual_weight` on a slice. evomerge's schema (`recipe.py`) forbids unknown keys; this module
walks the raw mapping first and sorts every key it does not know:
- close to a key known at that place (or to a parameter of the recipe's merge method): a typo. All of
  them are reported together in one ConfigError, each with "did you mean";
- anything else: mergekit ignores it, and so does evomerge: one `ConfigWarning` line naming the key and
  saying it has no effect, and the key is dropped before the schema reads the rest.
A parameter that the method does not take, or a global option given in one model's parameters (which
mergekit reads only from the slice, module or top-level parameters), has no effect: a warning.
mergekit's mapping form of a model reference (`{model: {path, revision}, lora: ...}`) becomes the
string form (`path@revision+lora`) that the rest of evomerge reads.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import ConfigError, ConfigWarning

# node kind -> {key: kind of its value, or None for a plain value}. `x[]`: a list of x, `x{}`: a
# mapping of names to x, `ref`: a model reference, `params`/`params*`: a parameters block (shared /
# one model's own).
NODES: dict[str, dict[str, str | None]] = {
    "recipe": {"name": None, "merge_method": None, "base_model": "ref", "models": "model[]",
               "slices": "slice[]", "modules": "module{}", "parameters": "params", "dtype": None,
               "out_dtype": None, "tokenizer_source": "ref", "tokenizer": "tokenizer", "chat_template": None,
               "random_seed": None},
    "model": {"model": "ref", "parameters": "params*"},
    "slice": {"sources": "source[]", "base_model": "ref", "parameters": "params"},
    "source": {"model": "ref", "layer_range": None, "parameters": "params*"},
    "module": {"models": "model[]", "slices": "slice[]", "parameters": "params"},
    "tokenizer": {"source": "ref", "tokens": "token{}", "pad_to_multiple_of": None},
    "token": {"source": "token_source", "force": None},
    "token_source": {"kind": None, "model": "ref", "token_id": None, "token": None},
    "cond": {"filter": None, "value": None},
}
# keys mergekit's schema knows (or that are common in published configs) but that change nothing
IGNORED = {
    ("model", "revision"): "mergekit reads a revision only as part of the reference: model: NAME@REVISION",
    ("source", "revision"): "mergekit reads a revision only as part of the reference: model: NAME@REVISION",
    ("slice", "residual_weight"): "mergekit 0.1.5 reads it but never uses it",
}


@dataclass
class _Findings:
    typos: list[tuple[str, str]] = field(default_factory=list)  # (path of the key, "did you mean" hint)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path of the key, why it has no effect)


def sort_keys(data: dict, source: str | None = None) -> dict:
    """`data` without the keys that have no effect (a ConfigWarning each); typos raise one ConfigError
    that names every one of them. `source` (the file) prefixes the paths in messages."""
    method = _method(data.get("merge_method"))
    found = _Findings()
    cleaned = _walk(data, "recipe", "", found, method)
    prefix = f"{source}: " if source else ""
    if found.typos:
        raise _typo_error(found.typos, prefix)
    for path, why in found.ignored:
        key = path.rsplit(".", 1)[-1]
        warnings.warn(ConfigWarning(f"{prefix}{path}: '{key}' has no effect ({why}); it is ignored"), stacklevel=3)
    return cleaned


def _method(name: Any):
    from evomerge.engine import methods

    if not isinstance(name, str) or name not in methods.names():
        return None  # the schema and the method registry report it
    return methods.get(name)


def _walk(value: Any, kind: str | None, path: str, found: _Findings, method) -> Any:
    if kind is None:
        return value
    if kind.endswith("[]"):
        if not isinstance(value, list):
            return value
        return [_walk(v, kind[:-2], f"{path}[{i}]", found, method) for i, v in enumerate(value)]
    if kind.endswith("{}"):
        if not isinstance(value, dict):
            return value
        return {k: _walk(v, kind[:-2], f"{path}[{k!r}]" if kind == "token{}" else _join(path, k), found, method)
                for k, v in value.items()}
    if kind == "ref":
        return reference_text(value, path)
    if kind in ("params", "params*"):
        return _parameters(value, path, found, method, per_model=kind == "params*")
    if kind == "token_source" and not (isinstance(value, dict) and "kind" in value):
        return reference_text(value, path)
    return _node(value, kind, path, found, method)


def _node(value: Any, kind: str, path: str, found: _Findings, method) -> Any:
    if not isinstance(value, dict):
        return value
    fields = NODES[kind]
    out = {}
    for key, v in value.items():
        at = _join(path, str(key))
        if key in fields:
            out[key] = _walk(v, fields[key], at, found, method)
        elif (kind, key) in IGNORED:
            found.ignored.append((at, IGNORED[(kind, key)]))
        else:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            if close:
                found.typos.append((at, f"did you mean '{close[0]}'?"))
            else:
                found.ignored.append((at, "mergekit ignores keys it does not know"))
    return out


def _parameters(block: Any, path: str, found: _Findings, method, *, per_model: bool) -> Any:
    if not isinstance(block, dict) or method is None:
        return block
    out = {}
    for name, setting in block.items():
        at = _join(path, str(name))
        tunable = method.tunable(name)
        if tunable is not None and per_model and tunable.kind == "global":
            found.ignored.append((at, f"a global option of {method.name}: mergekit reads it only from the "
                                      "top-level, module or slice parameters"))
        elif tunable is not None:
            out[name] = _conditions(setting, at, found, method)
        elif name in _all_parameter_names():
            found.ignored.append((at, f"{method.name} does not take it"))
        else:
            close = difflib.get_close_matches(str(name), list(method.param_names()), n=1)
            if close:
                found.typos.append((at, f"did you mean '{close[0]}'?"))
            else:
                found.ignored.append((at, f"{method.name} takes {', '.join(method.param_names()) or 'no parameters'}"))
    return out


def _conditions(setting: Any, path: str, found: _Findings, method) -> Any:
    """A setting's `{filter, value}` entries checked like any other mapping."""
    if isinstance(setting, dict):
        return _node(setting, "cond", path, found, method)
    if isinstance(setting, list):
        return [_node(s, "cond", f"{path}[{i}]", found, method) if isinstance(s, dict) else s
                for i, s in enumerate(setting)]
    return setting


def _all_parameter_names() -> set[str]:
    from evomerge.engine import methods

    return {t.name for name in methods.names() for t in methods.get(name).tunables}


def reference_text(value: Any, path: str) -> Any:
    """mergekit's mapping form of a model reference as its string form; strings pass unchanged.

    `{model: {path: P, revision: R}, lora: {path: L}}` -> `P@R+L` (`model:` may itself be a string)."""
    if not isinstance(value, dict):
        return value
    unknown = sorted(set(value) - {"model", "lora", "path", "revision"})
    if unknown:
        raise ConfigError(f"'{unknown[0]}' in a model reference is not supported by evomerge", where=path,
                          fix="name the model as a string: ORG/NAME, ORG/NAME@REVISION, a folder, or BASE+LORA")
    if "path" in value:  # a bare ModelPath
        return str(value["path"]) + (f"@{value['revision']}" if value.get("revision") else "")
    text = reference_text(value.get("model"), path)
    if value.get("lora") is not None:
        text = f"{text}+{reference_text(value['lora'], path)}"
    return text


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _typo_error(typos: list[tuple[str, str]], prefix: str) -> ConfigError:
    if len(typos) == 1:
        path, hint = typos[0]
        key = path.rsplit(".", 1)[-1]
        return ConfigError(f"unknown key '{key}'", where=f"{prefix}{path}", fix=hint)
    listing = "; ".join(f"{path} ({hint})" for path, hint in typos)
    return ConfigError(f"{len(typos)} unknown keys: {listing}", where=prefix.rstrip(": ") or "recipe",
                       fix="correct their spelling (mergekit would silently ignore them and merge with defaults)")


__all__ = ["IGNORED", "NODES", "reference_text", "sort_keys"]
