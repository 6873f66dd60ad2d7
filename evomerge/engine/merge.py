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
from evomerge.engine.modelcard import CardFacts, SourceFacts, hub_id, render_card
from evomerge.engine.output import check_out, copy_side_files, human_bytes, staged
from evomerge.engine.plan import DEFAULT_SEED, MergePlan, check_recipe, plan
from evomerge.engine.recipe import MergeRecipe, load_recipe
from evomerge.engine.sinks import ITEM_SIZE

if TYPE_CHECKING:  # pragma: no cover
    from evomerge.engine.checkpoints import Sources


def _open_for(recipe: MergeRecipe, device: str = "cpu", reads: str = "mmap") -> "Sources":
    from evomerge.engine.checkpoints import Sources

    where = recipe.model_fields_paths()
    models = {m: where[m] for m in recipe.referenced_models()}
    return Sources.open(models, device=device, reads=reads)


def _tokenizer_dir(recipe: MergeRecipe, p: MergePlan, sources: "Sources") -> Path:
    from evomerge.engine.checkpoints import resolve_model_path

    ts = recipe.tokenizer_source
    if ts is None:
        return sources.path(p.donor)
    if ts == "base":
        return sources.path(recipe.base_model)
    path = resolve_model_path(ts)
    if not path.is_dir():
        raise CheckpointError(f"tokenizer_source folder {ts!r} not found (looked at {path.absolute()})",
                              where="tokenizer_source",
                              fix="give base, or the local folder of a model whose tokenizer to use")
    return path


def _check_tokenizer(tok_dir: Path, p: MergePlan, sources: "Sources", where: str) -> int | None:
    from evomerge.engine.checkpoints import _tokenizer_vocab_size

    n = _tokenizer_vocab_size(tok_dir)
    if n is None:
        return None
    emb = next((t.spec for t in p.tasks if "embed_tokens" in t.name), None)
    rows = emb.shape[0] if emb is not None and emb.shape else None
    if rows is not None and n > rows:
        raise CheckpointError(
            f"the tokenizer in {tok_dir} has {n} tokens but the merged embeddings have {rows} rows",
            where=where, fix="use the tokenizer of one of the merged models (tokenizer_source: base)")
    for m in sources.models:
        other = sources.checkpoint(m).vocab_size
        if other is not None and other != n:
            raise CheckpointError(
                f"tokenizer vocab sizes disagree: {tok_dir} has {n} tokens, {m} has {other}",
                where=where, fix="merge models that share one tokenizer")
    return n



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
    tok_dir = _tokenizer_dir(recipe, p, sources)
    _check_tokenizer(tok_dir, p, sources, "tokenizer_source" if recipe.tokenizer_source else
                     recipe.model_fields_paths().get(p.donor, "models"))
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
            copy_side_files(tmp, config_from=donor_dir, tokenizer_from=tok_dir)
            if recipe.chat_template:
                write_chat_template(tmp, chat_template_text(recipe, sources))
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
        listed.append(SourceFacts(model=m, is_base=m == recipe.base_model, n_tensors=len(ck.tensors),
                                  nbytes=sum(nbytes(i.shape, i.dtype) for i in ck.tensors.values())))
    return CardFacts(name=name, method=recipe.merge_method, reference_url=p.method.reference_url,
                     base_model=hub_id(recipe.base_model, sources.config(recipe.base_model) if recipe.base_model
                                       else None),
                     recipe_text=recipe_text, sources=tuple(listed),
                     n_tensors=len(p.tasks), num_layers=p.num_layers, nbytes=p.nbytes, donor=p.donor)


def validate_config(config_path: str | os.PathLike, *, trust_remote_code: bool = False,
                    model_root: str | os.PathLike | None = None) -> str:
    """`evomerge validate`: every check `merge` makes, without merging; returns a short summary."""
    recipe = load_recipe(config_path)
    if model_root is not None:
        recipe = recipe.relocated(model_root)
    method = check_recipe(recipe)
    sources = _open_for(recipe)
    try:
        sources.check_custom_code(allowed=trust_remote_code, flag="--trust-remote-code")
        p = plan(recipe, sources)
        tok_dir = _tokenizer_dir(recipe, p, sources)
        n_tok = _check_tokenizer(tok_dir, p, sources, "tokenizer_source" if recipe.tokenizer_source else "models")
    finally:
        sources.close()
    n_models = len(recipe.referenced_models())
    dtypes = sorted({t.spec.dtype for t in p.tasks})
    lines = [
        f"ok: {config_path}",
        f"  method      {method.name} over {n_models} model(s)" + (f", base {recipe.base_model}" if recipe.base_model else ""),
        f"  output      {len(p.tasks)} tensors, {p.num_layers} layers, {', '.join(dtypes)}, {human_bytes(p.nbytes)}",
        f"  config from {p.donor}; tokenizer from {tok_dir}" + (f" ({n_tok} tokens)" if n_tok else ""),
    ]
    if method.uses_generator:
        seed = recipe.random_seed if recipe.random_seed is not None else DEFAULT_SEED
        lines.append(f"  random_seed {seed}" + ("" if recipe.random_seed is not None else " (default; add random_seed to pin it)"))
    return "\n".join(lines)


__all__ = ["card_facts", "merge_to_dir", "validate_config"]
