"""The embedded toy model family: a base, one expert per skill, and an lm-eval task mixture.

Nothing in this project may download weights or data sets, yet the first command a newcomer runs must
be a real search. So the package ships a tiny family of trained Llama models (see `docs/toy_family.md`)
inside `evomerge/toy/data/`, with one lm-eval task per skill and three instance-disjoint splits
(`search`, `select`, `report`). `family()` locates the shipped copy; `build()` rebuilds it
deterministically (same seed, same bytes) and `build(quick=True)` makes a reduced one in seconds.

Layout of a family folder::

    tokenizer/                 byte-level tokenizer (AutoTokenizer loads it)
    base/                      Hugging Face folder: config, fp16 safetensors, tokenizer
    experts/<skill>/           one fine-tuned expert per skill, same layout
    tasks/                     lm-eval include path: toy_<skill>_<split>.yaml, groups toy_<split>,
                               _toy_common.yaml, toy_loader.py, data/<skill>_<split>.jsonl
    manifest.json              skills, mixture weights, split sizes + sha256, training settings
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from evomerge.errors import CheckpointError, ConfigError, OutputError
from evomerge.toy.skills import SKILLS, normalize

SPLITS = ("search", "select", "report")
MANIFEST = "manifest.json"
SHIPPED = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class ToyFamily:
    """Where a built family lives and what it holds (all paths absolute)."""

    root: Path
    tokenizer: Path
    base: Path
    experts: dict[str, Path]
    tasks_dir: Path
    skills: tuple[str, ...]
    mixture: dict[str, float]

    def tasks(self, split: str) -> list[str]:
        """The lm-eval task names of one split, e.g. `toy_rev_search`, in skill order."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}", where="toy family", fix=f"use one of {', '.join(SPLITS)}")
        return [f"toy_{s}_{split}" for s in self.skills]

    @property
    def models(self) -> dict[str, Path]:
        """Every member by name: `base` and `expert_<skill>`."""
        return {"base": self.base, **{f"expert_{s}": p for s, p in self.experts.items()}}


# --- build settings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildPlan:
    """Everything `build` varies: the skills, model shape, base and expert schedules, split sizes,
    mixture."""

    skills: tuple[str, ...]  # one expert and one task per skill (skills.SKILLS names)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    base_steps: int
    base_lr: float
    base_corpus: dict[str, float]
    expert_steps: dict[str, int]
    expert_lr: dict[str, float]
    expert_replay: float  # share of each expert's batches drawn from the other skills
    split_sizes: dict[str, int]
    mixture: dict[str, float]
    batch: int = 64
    replay_targets: str = "truth"  # "base": replayed instances are answered by the base (self-distillation)
    replay_variant: str = ""  # ":easy" replays the base's narrow range of the other skills
    expert_layers: dict[str, list[int]] | None = None  # fine-tune only these decoder layers
    expert_optimizer: str = "adamw"  # "sgd": task vectors follow the accumulated gradients
    notes: str = ""


FULL = BuildPlan(
    skills=("rev", "sort", "up", "next"),
    hidden=128,
    intermediate=256,
    layers=4,
    heads=4,
    base_steps=400,
    base_lr=3e-3,
    base_corpus={"rev": 1.0, "sort": 1.0, "up": 0.3, "next": 0.3},
    expert_steps={"rev": 300, "sort": 300, "up": 300, "next": 300},
    expert_lr={"rev": 3e-4, "sort": 3e-4, "up": 1e-3, "next": 1e-3},
    expert_replay=0.4,
    replay_targets="base",
    split_sizes={"search": 512, "select": 300, "report": 300},
    mixture={"rev": 0.25, "sort": 0.25, "up": 0.25, "next": 0.25},
)

QUICK = BuildPlan(
    skills=FULL.skills,
    hidden=32,
    intermediate=64,
    layers=2,
    heads=2,
    base_steps=12,
    base_lr=3e-3,
    base_corpus={"rev": 1.0, "sort": 1.0, "up": 1.0, "next": 1.0},
    expert_steps={"rev": 4, "sort": 4, "up": 4, "next": 4},
    expert_lr={"rev": 1e-3, "sort": 1e-3, "up": 1e-3, "next": 1e-3},
    expert_replay=0.4,
    replay_targets="base",
    split_sizes={"search": 24, "select": 12, "report": 12},
    mixture=FULL.mixture,
    batch=16,
    notes="reduced plan for tests: exercises every code path in seconds",
)


# --- locating ------------------------------------------------------------------------------------
def load(root: str | os.PathLike) -> ToyFamily:
    """Read a built family folder (its manifest) into a `ToyFamily`."""
    root = Path(root).resolve()
    path = root / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            "not a toy family folder (no manifest.json)",
            where=str(root),
            fix="build one with `evomerge toy build OUT` or use `evomerge toy path`",
        )
    manifest = json.loads(path.read_text())
    skills = tuple(manifest["skill_order"])
    return ToyFamily(
        root=root,
        tokenizer=root / manifest["tokenizer"],
        base=root / manifest["models"]["base"],
        experts={s: root / manifest["models"]["experts"][s] for s in skills},
        tasks_dir=root / manifest["tasks_dir"],
        skills=skills,
        mixture={s: float(manifest["mixture"][s]) for s in skills},
    )


def family() -> ToyFamily:
    """The family shipped inside the package (no build step, no network)."""
    return load(SHIPPED)


def manifest(fam: ToyFamily) -> dict:
    """The parsed manifest.json of a family."""
    return json.loads((fam.root / MANIFEST).read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- data and task files -------------------------------------------------------------------------
def draw_splits(
    sizes: dict[str, int], seed: int, skills: tuple[str, ...] = FULL.skills
) -> dict[str, dict[str, list[dict]]]:
    """Per skill, instance-disjoint (by normalized prompt) rows for every split."""
    out: dict[str, dict[str, list[dict]]] = {}
    for skill in skills:
        rng = random.Random(f"toy-eval/{seed}/{skill}")
        seen: set[str] = set()
        rows: list[dict] = []
        total = sum(sizes[s] for s in SPLITS)
        while len(rows) < total:
            prompt, answer = SKILLS[skill].draw(rng)
            key = normalize(prompt)
            if key in seen:
                continue
            seen.add(key)
            rows.append({"id": f"{skill}-{len(rows)}", "prompt": prompt, "answer": answer})
        out[skill] = {}
        start = 0
        for split in SPLITS:
            out[skill][split] = rows[start : start + sizes[split]]
            start += sizes[split]
    return out


_COMMON_YAML = """\
# Shared settings of every toy task (included by toy_<skill>_<split>.yaml).
# The data are local JSONL files next to this file; toy_loader.load resolves them relative to itself,
# so the tasks work wherever the package is installed and through `lm_eval --include_path`.
custom_dataset: !function toy_loader.load
test_split: test
output_type: generate_until
# Field names, not Jinja templates ("{{prompt}}"): lm-eval then reads the field directly instead of
# compiling a template per item and call (a third of a toy evaluate call); the text is the same.
doc_to_text: prompt
doc_to_target: answer
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_LOADER_PY = '''\
"""Load one toy split (local JSONL next to this file) for lm-eval's `custom_dataset` hook."""

import json
from pathlib import Path


class Rows(list):
    """A split's rows as plain dicts. lm-eval takes a list of dicts as a task's documents (it reads
    their `features` for the field names); iterating an arrow Dataset instead decodes every row on every
    pass, and lm-eval passes over all of a split's rows twice per call even to score a few of them."""

    def __init__(self, rows):
        super().__init__(rows)
        self.features = {key: None for key in (rows[0] if rows else {})}


def load(data_file, **_metadata):
    """Return {"test": rows} for `data_file`, a path relative to this folder."""
    path = Path(__file__).resolve().parent / data_file
    return {"test": Rows([json.loads(line) for line in path.read_text().splitlines() if line])}
'''


def write_tasks(tasks_dir: Path, splits: dict[str, dict[str, list[dict]]]) -> dict[str, dict]:
    """Write JSONL data, task YAMLs, groups and the loader; return the manifest's `splits` table."""
    data_dir = tasks_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (tasks_dir / "_toy_common.yaml").write_text(_COMMON_YAML)
    (tasks_dir / "toy_loader.py").write_text(_LOADER_PY)
    table: dict[str, dict] = {}
    for skill, by_split in splits.items():
        for split, rows in by_split.items():
            rel = f"data/{skill}_{split}.jsonl"
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
            (tasks_dir / rel).write_text(text)
            task = f"toy_{skill}_{split}"
            (tasks_dir / f"{task}.yaml").write_text(
                f"# {SKILLS[skill].description} ({split} split)\n"
                f"include: _toy_common.yaml\ntask: {task}\n"
                f"dataset_kwargs:\n  data_file: {rel}\n"
            )
            table[task] = {
                "skill": skill,
                "split": split,
                "file": f"{tasks_dir.name}/{rel}",
                "size": len(rows),
                "sha256": hashlib.sha256(text.encode()).hexdigest(),
            }
    for split in SPLITS:
        members = "\n".join(f"  - toy_{s}_{split}" for s in splits)
        (tasks_dir / f"toy_{split}.yaml").write_text(
            f"# Unweighted mean over the skills ({split} split); the weighted mixture is in manifest.json.\n"
            f"group: toy_{split}\ntask:\n{members}\n"
            "aggregate_metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
            "    weight_by_size: false\nmetadata:\n  version: 1.0\n"
        )
    return table


def _layer_filter(layers: list[int] | None) -> Callable[[str], bool] | None:
    """Parameter-name filter for an expert that fine-tunes only some decoder layers."""
    if layers is None:
        return None
    prefixes = tuple(f"model.layers.{i}." for i in layers)
    return lambda name: name.startswith(prefixes)


_BASE_FIELDS = ("skills", "hidden", "intermediate", "layers", "heads", "base_steps", "base_lr", "base_corpus",
                "batch", "split_sizes")  # and the skills' generators (toy/skills.py) must not have changed


def _check_reusable(root: Path, plan: BuildPlan, seed: int) -> None:
    old = json.loads((root / MANIFEST).read_text())
    mine = asdict(plan)
    diff = [f for f in _BASE_FIELDS if old["plan"].get(f) != json.loads(json.dumps(mine[f]))]
    if old["seed"] != seed or diff:
        raise CheckpointError(
            f"its base was built with other settings ({', '.join(diff) or 'seed'})",
            where=str(root),
            fix="reuse a base built with the same seed and base settings, or rebuild it",
        )


def _check_plan(plan: BuildPlan) -> None:
    """Names and keys of a plan agree (a typo would otherwise surface minutes into a build)."""
    unknown = [s for s in plan.skills if s not in SKILLS]
    if unknown or len(set(plan.skills)) != len(plan.skills) or len(plan.skills) < 2:
        raise ConfigError(f"skills must be two or more distinct names, got {list(plan.skills)}",
                          where="toy plan.skills", fix=f"choose from {', '.join(SKILLS)}")
    for field in ("expert_steps", "expert_lr", "mixture"):
        if set(getattr(plan, field)) != set(plan.skills):
            raise ConfigError(f"keys {sorted(getattr(plan, field))} do not match the skills {list(plan.skills)}",
                              where=f"toy plan.{field}", fix="give one entry per skill")
    background = [s for s in plan.base_corpus if s.partition(":")[0] not in SKILLS]
    if background:
        raise ConfigError(f"unknown skills {background} in the base corpus", where="toy plan.base_corpus",
                          fix=f"choose from {', '.join(SKILLS)}")
    if plan.replay_targets not in ("truth", "base"):
        raise ConfigError(f"unknown replay_targets {plan.replay_targets!r}", where="toy plan.replay_targets",
                          fix="use 'truth' or 'base'")


# --- build ---------------------------------------------------------------------------------------
def _stderr(msg: str) -> None:
    print(f"[toy] {msg}", file=sys.stderr, flush=True)


def build(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    quick: bool = False,
    overwrite: bool = False,
    plan: BuildPlan | None = None,
    log: Callable[[str], None] | None = _stderr,
    reuse_base: str | os.PathLike | None = None,
) -> ToyFamily:
    """Train and write a family into `out` (a temp folder next to it, renamed at the end).

    Deterministic: the same seed and plan give the same bytes (one CPU thread, deterministic
    algorithms). `quick=True` uses a reduced plan (tiny model, few steps) that builds in seconds.
    `reuse_base` (a tuning shortcut) copies the base of a family built with the same seed and the
    same base settings instead of retraining it; the result is the same bytes.
    """
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise OutputError(
                "output folder exists and is not empty",
                where=str(out),
                fix="pass a new folder, or replace it with --overwrite (overwrite=True)",
            )
    plan = plan or (QUICK if quick else FULL)
    _check_plan(plan)
    log = log or (lambda _m: None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with _deterministic():
            _Build(plan, seed, tmp, log).run(quick, reuse_base)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"family written to {out}")
    return load(out)


@contextlib.contextmanager
def _deterministic():
    """One torch thread and deterministic algorithms (bit-identical results; also the fastest on a busy
    2-core machine), no Hugging Face progress bars; the previous settings restored afterwards."""
    import torch
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per member is noise
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
        if bars:
            hf_logging.enable_progress_bar()


class _Build:
    """One family built into a temp folder: splits, tokenizer, base, one expert per skill, tasks, manifest."""

    def __init__(self, plan: BuildPlan, seed: int, tmp: Path, log: Callable[[str], None]):
        from evomerge.toy import training

        self.plan, self.seed, self.tmp, self.log = plan, seed, tmp, log
        self.shape = training.ModelShape(hidden=plan.hidden, intermediate=plan.intermediate, layers=plan.layers,
                                         heads=plan.heads)

    def run(self, quick: bool, reuse_base: str | os.PathLike | None) -> None:
        from evomerge.toy import training

        plan, seed, tmp = self.plan, self.seed, self.tmp
        splits = draw_splits(plan.split_sizes, seed, plan.skills)
        self.exclude = {normalize(r["prompt"]) for by in splits.values() for rows in by.values() for r in rows}
        self.tokenizer = training.build_tokenizer()
        self.tokenizer.save_pretrained(tmp / "tokenizer")
        base = self._base(reuse_base)
        # Experts start from the *stored* (fp16-rounded) base, so task vectors are exact differences.
        base_state = {k: v.detach().half().float() for k, v in base.state_dict().items()}
        teacher = None
        if plan.replay_targets == "base":
            teacher = training.new_model(self.shape, seed)
            teacher.load_state_dict(base_state)
        for index, skill in enumerate(plan.skills):
            self._expert(index, skill, base_state, teacher)
        table = write_tasks(tmp / "tasks", splits)
        (tmp / MANIFEST).write_text(json.dumps(self._manifest(table, quick), indent=2, sort_keys=True) + "\n")

    def _base(self, reuse_base: str | os.PathLike | None):
        """The base model, trained on the base corpus (or copied from `reuse_base`), saved."""
        from evomerge.toy import training

        plan, seed, tmp, log = self.plan, self.seed, self.tmp, self.log
        base = training.new_model(self.shape, seed)
        if reuse_base is not None:
            _check_reusable(Path(reuse_base), plan, seed)
            log(f"base: reused from {reuse_base}")
            src = training.load_model(Path(reuse_base) / "base")
            base.load_state_dict(src.state_dict())
            shutil.copytree(Path(reuse_base) / "base", tmp / "base")
        else:
            log(f"base: {sum(p.numel() for p in base.parameters())} parameters, {plan.base_steps} steps")
            training.train(
                base,
                training.Schedule(plan.base_steps, plan.base_lr, plan.base_corpus, batch=plan.batch, warmup=50),
                seed=seed * 1000 + 1,
                exclude=self.exclude,
                log=log,
            )
            training.save(base, self.tokenizer, tmp / "base")
        return base

    def _expert(self, index: int, skill: str, base_state: dict, teacher) -> None:
        """The expert of `skill`: the base fine-tuned on its skill (with replay of the others), saved."""
        from evomerge.toy import training

        plan, seed = self.plan, self.seed
        expert = training.new_model(self.shape, seed)
        expert.load_state_dict(base_state)
        others = [o for o in plan.skills if o != skill]
        mixture = {skill: 1.0 - plan.expert_replay}
        if plan.expert_replay > 0:
            mixture.update({o + plan.replay_variant: plan.expert_replay / len(others) for o in others})
        self.log(f"expert {skill}: {plan.expert_steps[skill]} steps at lr {plan.expert_lr[skill]}")
        training.train(
            expert,
            training.Schedule(
                plan.expert_steps[skill],
                plan.expert_lr[skill],
                mixture,
                batch=plan.batch,
                warmup=10,
                optimizer=plan.expert_optimizer,
            ),
            seed=seed * 1000 + 100 + index,
            exclude=self.exclude,
            trainable=_layer_filter(plan.expert_layers.get(skill)) if plan.expert_layers else None,
            teacher=teacher,
            own=(skill,),
        )
        training.save(expert, self.tokenizer, self.tmp / "experts" / skill)

    def _manifest(self, table: dict, quick: bool) -> dict:
        plan = self.plan
        return {
            "format": 1,
            "seed": self.seed,
            "quick": quick,
            "skill_order": list(plan.skills),
            "skills": {s: {"description": SKILLS[s].description} for s in plan.skills},
            "mixture": plan.mixture,
            "tokenizer": "tokenizer",
            "models": {"base": "base", "experts": {s: f"experts/{s}" for s in plan.skills}},
            "tasks_dir": "tasks",
            "splits": table,
            "plan": asdict(plan),
        }
