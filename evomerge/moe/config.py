"""mergekit-moe's YAML schema, strictly: the config a user hands to `evomerge moe` (or `mergekit-moe`).

Why it exists: a mixture of experts is described by a different file than a merge recipe (a base that
donates attention, norms and embeddings; experts that each donate their MLP; prompts that place the
router), and people already have such files for mergekit-moe. We read exactly that schema, with
`extra="forbid"` so that a typo (`positve_prompts`) fails loudly instead of being dropped, and write it
back (`to_yaml`) so that the search's winner is a config both tools build.

Our one extension is `random_seed` (mergekit-moe takes it on the command line as `--random-seed`, and
ignores the key): it seeds the `random`/`uniform_random` router draws and the experts' `noise_scale`, so
one config always gives one model. mergekit-moe ignores unknown keys, so it still reads our files.

Checks that need no checkpoint live here (`check`): experts_per_token against the expert count,
prompts for the prompt-driven gate modes, identical prompt sets. Checks against the checkpoints
(architectures, shapes, a base with no MoE counterpart) live in `moe/build.py`.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from evomerge.errors import ConfigError
from evomerge.yamlfile import comment_header
from evomerge.yamlfile import parse as parse_yaml
from evomerge.yamlfile import read_text
from evomerge.engine.seeds import DEFAULT_SEED, Seed

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random")
# mergekit's router also reads these two spellings: "hidden" is the last prompt token's hidden state,
# "hidden_avg" the mean over the prompt's tokens ("hidden_last" is "hidden" by another name).
GATE_MODE_ALIASES = ("hidden_avg", "hidden_last")
PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")
DTYPES = ("float32", "float16", "bfloat16")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expert(_Strict):
    """One dense fine-tune that becomes one expert (its MLP) in every layer."""

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None

    @field_validator("noise_scale", "residual_scale")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and (v != v or v in (float("inf"), float("-inf"))):
            raise ValueError("must be a finite number")
        return v

    @field_validator("noise_scale")
    @classmethod
    def _non_negative(cls, v: float | None) -> float | None:
        if v is not None and v < 0:
            raise ValueError(f"noise_scale must be >= 0, got {v}")
        return v


class MoEConfig(_Strict):
    """mergekit-moe 0.1.5's `MoEMergeConfig`, plus `random_seed`."""

    base_model: str
    experts: list[Expert]
    gate_mode: Literal["hidden", "cheap_embed", "random", "uniform_random", "hidden_avg", "hidden_last"] = "hidden"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    random_seed: Seed | None = None

    # --- reading --------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, text: str, *, source: str | None = None) -> "MoEConfig":
        data = parse_yaml(text, where=source or "moe config")
        if not isinstance(data, dict):
            raise ConfigError("an MoE config must be a YAML mapping with base_model and experts",
                              where=source or "moe config", fix="see examples/moe/ for a complete config")
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: dict, *, source: str | None = None) -> "MoEConfig":
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _config_error(exc, source) from None

    # --- writing --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self, comments: Iterable[str] = ()) -> str:
        import yaml

        header = comment_header(comments)
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False,
                                       allow_unicode=True, width=100)

    # --- convenience ----------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        return DEFAULT_SEED if self.random_seed is None else self.random_seed

    @property
    def all_experts(self) -> list[Expert]:
        return list(self.experts) + list(self.shared_experts or [])

    def referenced_models(self) -> list[str]:
        """Every model path, base first, in first-mention order."""
        seen: dict[str, None] = {self.base_model: None}
        for e in self.all_experts:
            seen[e.source_model] = None
        return list(seen)

    def model_fields_paths(self) -> dict[str, str]:
        """model path -> the YAML field where it is first mentioned (for error messages)."""
        where = {self.base_model: "base_model"}
        for i, e in enumerate(self.experts):
            where.setdefault(e.source_model, f"experts[{i}].source_model")
        for i, e in enumerate(self.shared_experts or []):
            where.setdefault(e.source_model, f"shared_experts[{i}].source_model")
        return where

    def relocated(self, root: str | os.PathLike) -> "MoEConfig":
        """The same config with every model folder looked up by its name under `root` (never outside it)."""
        from evomerge.engine.model_root import under_root

        mapping = under_root(self.referenced_models(), root,
                             fix="build with the paths as written, or rename one of the folders")
        data = self.to_dict()
        data["base_model"] = mapping[data["base_model"]]
        for key in ("experts", "shared_experts"):
            for e in data.get(key) or []:
                e["source_model"] = mapping[e["source_model"]]
        return MoEConfig.from_dict(data)

    # --- checks without checkpoints ---------------------------------------------------------------
    def check(self, *, allow_all_same: bool = False, source: str | None = None) -> None:
        """mergekit-moe's config checks, as ConfigErrors that name the field (and a few more)."""
        pre = f"{source}: " if source else ""
        n = len(self.experts)
        if n == 0:
            raise ConfigError("no experts given", where=f"{pre}experts",
                              fix="list at least two experts, each with source_model (and prompts)")
        if self.experts_per_token < 1:
            raise ConfigError(f"experts_per_token must be at least 1, got {self.experts_per_token}",
                              where=f"{pre}experts_per_token", fix="use 1 or 2 (Mixtral routes each token to 2)")
        if self.experts_per_token > n:
            raise ConfigError(f"experts_per_token is {self.experts_per_token} but only {n} expert(s) are listed",
                              where=f"{pre}experts_per_token",
                              fix=f"use at most {n}, or list more experts")
        if self.shared_experts:
            has = [bool(e.positive_prompts) for e in self.shared_experts]
            if any(has) and not all(has):
                raise ConfigError("some shared experts have prompts and some do not",
                                  where=f"{pre}shared_experts",
                                  fix="give prompts to every shared expert or to none")
        if self.gate_mode in PROMPT_MODES:
            for key, group in (("experts", self.experts), ("shared_experts", self.shared_experts or [])):
                for i, e in enumerate(group):
                    if key == "shared_experts" and not any(s.positive_prompts for s in group):
                        continue  # shared experts without prompts: no gate of their own (DeepSeek style)
                    if not e.positive_prompts:
                        raise ConfigError(
                            f"gate_mode {self.gate_mode} places the router from prompts, but this expert has none",
                            where=f"{pre}{key}[{i}].positive_prompts",
                            fix="give a few prompts that should go to this expert, or use gate_mode: random")
                    for j, p in enumerate(list(e.positive_prompts) + list(e.negative_prompts or [])):
                        if not p.strip():
                            field = "positive_prompts" if j < len(e.positive_prompts) else "negative_prompts"
                            raise ConfigError("an empty prompt", where=f"{pre}{key}[{i}].{field}",
                                              fix="remove it or write the prompt's text")
            prompts = [(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in self.experts]
            for i, p in enumerate(prompts):
                for j in range(i):
                    if prompts[j] == p:
                        raise ConfigError(
                            f"experts[{j}] and experts[{i}] have the same prompts, so the router cannot tell "
                            "them apart", where=f"{pre}experts[{i}].positive_prompts",
                            fix="give each expert prompts that describe what should be routed to it")
        if not allow_all_same and n > 1 and len({e.source_model for e in self.experts}) == 1:
            raise ConfigError(
                "every expert is the same model: the MoE would cost more and compute exactly the same",
                where=f"{pre}experts", fix="use different fine-tunes, or pass --allow-all-same if you will "
                                           "train the result (mergekit-moe: --i-understand-this-is-not-useful-"
                                           "without-training)")


def load_moe_config(path: str | os.PathLike) -> MoEConfig:
    """Read an MoE config file; a missing or malformed file is a ConfigError naming it."""
    text = read_text(path, what="MoE config file",
                     missing_fix="check the path (relative paths are resolved from the current folder)")
    return MoEConfig.from_yaml(text, source=str(path))


def is_moe_config(data: Any) -> bool:
    """Whether parsed YAML reads as an MoE config (it lists experts) rather than a merge recipe."""
    return isinstance(data, dict) and "experts" in data and "merge_method" not in data


def is_moe_file(path: str | os.PathLike) -> bool:
    """Whether the YAML file at `path` is an MoE config (False when unreadable: the caller reports that)."""
    try:
        return is_moe_config(parse_yaml(Path(path).read_text(encoding="utf-8"), where=str(path)))
    except (OSError, UnicodeDecodeError, ConfigError):
        return False


_FIELDS = {"config": list(MoEConfig.model_fields), "expert": list(Expert.model_fields)}


def _config_error(exc: ValidationError, source: str | None) -> ConfigError:
    def rank(e):
        return {"extra_forbidden": 0, "missing": 1}.get(e["type"], 2)

    err = sorted(exc.errors(), key=rank)[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else ("." if path else "") + str(part)
    where = f"{source}: {path or 'moe config'}" if source else (path or "moe config")
    if err["type"] == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        known = _FIELDS["expert" if any(p in ("experts", "shared_experts") for p in loc[:-1]) else "config"]
        close = difflib.get_close_matches(key, known, n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"allowed keys here: {', '.join(known)}"
        if key == "merge_method":
            fix = "this is a merge recipe, not an MoE config: build it with `evomerge merge`"
        return ConfigError(f"unknown key '{key}'", where=where, fix=fix)
    if err["type"] == "missing":
        return ConfigError("required key is missing", where=where, fix="add it (see examples/moe/)")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    fix = None
    if loc and loc[-1] == "gate_mode":
        given = err.get("input")
        close = difflib.get_close_matches(str(given), GATE_MODES, n=1)
        msg = f"unknown gate_mode {given!r}"
        fix = (f"did you mean '{close[0]}'? " if close else "") + f"use one of {', '.join(GATE_MODES)}"
    elif loc and loc[-1] == "dtype":
        fix = f"use one of {', '.join(DTYPES)}"
    return ConfigError(msg, where=where, fix=fix)


__all__ = ["MoEConfig", "Expert", "load_moe_config", "is_moe_config", "is_moe_file", "GATE_MODES", "PROMPT_MODES"]
