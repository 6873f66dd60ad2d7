"""`evomerge merge` and `evomerge validate` for recipes: a mergekit YAML recipe into a model folder.

Why it exists: the engine's command-line merge, usable alone like mergekit-yaml. `merge_to_dir` opens
the recipe's sources, plans (`plan.py`), executes the plan into streamed safetensors shards
(`execution.py`) in a temp folder next to OUT, adds config, generation config, tokenizer (with the
recipe's chat template), the recipe and a model card, then renames the folder into place.
`validate_config` makes every check the merge makes, without merging.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import CheckpointError, ConfigError
from evomerge.engine.chat_template import chat_template_text, write_chat_template
from evomerge.engine.execution import execute, merge_threads, resolve_device
from evomerge.engine.memory import MergeMemory, memory_lines, merge_memory
from evomerge.engine.modelcard import CardFacts, SourceFacts, hub_id, render_card
from evomerge.engine.output import check_out, copy_side_files, human_bytes, staged
from evomerge.engine.plan import DEFAULT_SEED, MergePlan, check_recipe, plan
from evomerge.engine.recipe import MergeRecipe, load_recipe
from evomerge.engine.sinks import ITEM_SIZE

if TYPE_CHECKING:  # pragma: no cover
    from evomerge.engine.checkpoints import Sources


def _open_for(recipe: MergeRecipe, device: str = "cpu", reads: str = "mmap") -> "Sources":
    """Every reference of the recipe located first (Hub ids from the cache or downloaded, one line on
    stderr each saying which commit), then the merged models opened."""
    from evomerge.engine.checkpoints import Sources
    from evomerge.engine.references import locate_all, stderr_line

    where = recipe.model_fields_paths()
    merged = recipe.referenced_models()
    located = locate_all(where, log=stderr_line, weights={m: m in merged for m in where})
    return Sources.open({m: where[m] for m in merged}, device=device, reads=reads, locations=located)


def _tokenizer(p: MergePlan, sources: "Sources") -> tuple[Path | None, int | None]:
    """(the folder whose tokenizer files the output copies, or None when the plan's vocabulary writes a
    new tokenizer; the output's token count, when known)."""
    if p.vocabulary is not None:
        return (None if p.vocabulary.changed else p.vocabulary.folder), len(p.vocabulary.vocab)
    return sources.path(p.donor), sources.checkpoint(p.donor).vocab_size


def _write_tokenizer(tmp: Path, recipe: MergeRecipe, p: MergePlan, sources: "Sources") -> None:
    """Generation config from the donor; tokenizer files copied, or the new vocabulary's tokenizer
    saved; the recipe's chat template written into it."""
    tok_dir, _ = _tokenizer(p, sources)
    copy_side_files(tmp, config_from=sources.path(p.donor), tokenizer_from=tok_dir)
    if tok_dir is None:
        p.vocabulary.tokenizer.save_pretrained(str(tmp))
    template = chat_template_text(recipe, sources) if recipe.chat_template else None
    if template:
        write_chat_template(tmp, template)


def merge_to_dir(config_path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                 shard_size: int | str = "5GB", device: str = "cpu", progress: bool = True,
                 threads: int | None = None, trust_remote_code: bool = False,
                 model_root: str | os.PathLike | None = None) -> Path:
    """`evomerge merge`: merge the recipe at `config_path` into the folder `out` (HF layout).
    `trust_remote_code`: accept sources with their own code (config `auto_map`); the donor's code files
    are copied next to the merged config, so that the result loads. `model_root`: look every model
    folder up by its name there (a recipe from another machine); the output records the moved recipe."""
    from evomerge.engine.sinks import ShardedSafetensorsSink, parse_size

    out = Path(out)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}", where="--threads",
                          fix="omit it (default 2) or give a positive number")
    merge_threads(threads)
    recipe = load_recipe(config_path)
    recipe_text = Path(config_path).read_text(encoding="utf-8")
    if model_root is not None:
        recipe = recipe.relocated(model_root)
        recipe_text = recipe.to_yaml(comments=[f"{config_path}, model folders under {model_root}"])
    check_recipe(recipe)
    shard_bytes = parse_size(shard_size)
    check_out(out, overwrite)
    device = resolve_device(device)
    sources = _open_for(recipe, device, reads="copy")
    sources.check_custom_code(allowed=trust_remote_code, flag="--trust-remote-code")
    p = plan(recipe, sources)
    check_out(out, overwrite, sources)

    try:
        with staged(out) as tmp:
            sink = ShardedSafetensorsSink(tmp, shard_bytes)
            execute(p, sink, sources, progress=progress, device=device, threads=threads)
            (tmp / "config.json").write_text(json.dumps(p.out_config, indent=2, sort_keys=True) + "\n",
                                             encoding="utf-8")
            donor_dir = sources.path(p.donor)
            for code in sources.code_files(p.donor):  # the config's auto_map points at these
                (tmp / code.relative_to(donor_dir)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(code, tmp / code.relative_to(donor_dir))
            _write_tokenizer(tmp, recipe, p, sources)
            (tmp / "mergekit_config.yml").write_text(recipe_text, encoding="utf-8")
            (tmp / "README.md").write_text(render_card(card_facts(recipe, recipe_text, p, sources, out.name)),
                                           encoding="utf-8")
    finally:
        sources.close()
    return out


def card_facts(recipe: MergeRecipe, recipe_text: str, p: MergePlan, sources: "Sources", name: str) -> CardFacts:
    """What the model card says about this merge, as plain data."""
    def nbytes(shape, dtype: str) -> int:
        n = 1
        for d in shape:
            n *= d
        return n * ITEM_SIZE.get(dtype, 4)

    listed = []
    for m in recipe.referenced_models():
        ck = sources.checkpoint(m)
        origins = ck.location.origins() if ck.location is not None else []
        listed.append(SourceFacts(model=m, is_base=m == recipe.base_model, n_tensors=len(ck.tensors),
                                  nbytes=sum(nbytes(i.shape, i.dtype) for i in ck.tensors.values()),
                                  origins=tuple(f"{role} {o.describe()}" for role, o in origins)))
    base = sources.checkpoint(recipe.base_model) if recipe.base_model else None
    base_repo = base.location.origin.repo if base and base.location and base.location.origin else None
    return CardFacts(name=name, method=recipe.merge_method, reference_url=p.method.reference_url,
                     base_model=base_repo or hub_id(recipe.base_model, base.config if base else None),
                     recipe_text=recipe_text, sources=tuple(listed),
                     n_tensors=len(p.tasks), num_layers=p.num_layers, nbytes=p.nbytes, donor=p.donor)


def validate_config(config_path: str | os.PathLike, *, trust_remote_code: bool = False,
                    model_root: str | os.PathLike | None = None, device: str = "cpu") -> str:
    """`evomerge validate`: every check `merge` makes, without merging; returns a short summary, with the
    memory the merge will need on `device` (engine/memory.py)."""
    recipe = load_recipe(config_path)
    if model_root is not None:
        recipe = recipe.relocated(model_root)
    method = check_recipe(recipe)
    sources = _open_for(recipe)
    try:
        sources.check_custom_code(allowed=trust_remote_code, flag="--trust-remote-code")
        p = plan(recipe, sources)
        tok_dir, n_tok = _tokenizer(p, sources)
        memory = merge_memory(p, sources, device=resolve_device(device) if device == "auto" else device)
    finally:
        sources.close()
    n_models = len(recipe.referenced_models())
    dtypes = sorted({t.spec.dtype for t in p.tasks})
    lines = [
        f"ok: {config_path}",
        f"  method      {method.name} over {n_models} model(s)" + (f", base {recipe.base_model}" if recipe.base_model else ""),
        f"  output      {len(p.tasks)} tensors, {p.num_layers} layers, {', '.join(dtypes)}, {human_bytes(p.nbytes)}",
        f"  config from {p.donor}; tokenizer " + (f"from {tok_dir}" if tok_dir else
                                                  f"{recipe.tokenizer_choice} (built)") + (f" ({n_tok} tokens)" if n_tok else ""),
    ]
    if method.uses_generator:
        seed = recipe.random_seed if recipe.random_seed is not None else DEFAULT_SEED
        lines.append(f"  random_seed {seed}" + ("" if recipe.random_seed is not None else " (default; add random_seed to pin it)"))
    return "\n".join(lines + memory_lines(memory))


def recipe_memory(config_path: str | os.PathLike, *, device: str = "cpu", workers: int | None = None,
                  model_root: str | os.PathLike | None = None) -> MergeMemory:
    """The memory plan of `evomerge merge` for a recipe file (its sources' headers are read, no tensor)."""
    recipe = load_recipe(config_path)
    if model_root is not None:
        recipe = recipe.relocated(model_root)
    check_recipe(recipe)
    sources = _open_for(recipe)
    try:
        return merge_memory(plan(recipe, sources), sources, workers=workers, device=device)
    finally:
        sources.close()


__all__ = ["card_facts", "merge_to_dir", "recipe_memory", "validate_config"]
