"""The merged model's vocabulary: mergekit's `tokenizer_source` and `tokenizer:` block, and the embedding
rows that follow from it.

Why it exists: models fine-tuned from one base often add tokens (`<|im_start|>`...), and published
recipes ask for the `union` of the inputs' vocabularies, for one model's, or for extra `tokens:` with
a stated source. Then every input's embedding and output matrices (`embed_tokens`, `lm_head`) must be
re-indexed to the output vocabulary before the method merges them, row by row, as mergekit 0.1.5 does:

- the output tokenizer is the base model's (`base`; the first model without a base), a named model's,
  or the `union`: the base's, plus every other model's tokens it lacks (plain tokens first, in each
  model's id order, then added tokens with their settings, the first model's settings winning), plus
  each `tokens:` key not yet in it; `pad_to_multiple_of` rounds the row count up;
- a model's row for a token is its own row of that token; a token some input lacks gets a default
  row: the `tokens:` entry's source (a model's row for that token, `{kind: model_token, model, token |
  token_id}`, or `{kind: zero}`), else the only input that has it, else the base's, else the mean of the
  inputs that have it (summed in input order, then divided); `force: true` uses the entry's source
  even for inputs that have the token; padding rows are each input's mean row;
- the output config's vocab_size is the row count.
mergekit adds the union's new tokens in the order of a hash map (so their ids vary between its runs
when two or more are new) and picks an arbitrary first model when there is no base; evomerge uses
each model's id order and the first listed model, so the same recipe always gives the same ids.
`plan.py` builds it once per recipe; `execution.py` re-indexes each vocabulary tensor through `rows`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from evomerge.errors import CheckpointError, ConfigError
from evomerge.engine.recipe import MergeRecipe, ModelTokenSource, TokenEmbedding, ZeroSource

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from evomerge.engine.checkpoints import Sources


@dataclass
class Vocabulary:
    """The output vocabulary and, per model, where each output token's row comes from."""

    tokenizer: Any  # the output tokenizer (transformers)
    vocab: dict[str, int]  # output token -> id (ids 0..len-1)
    size: int  # rows of the output matrices (len(vocab), padded)
    permutations: dict[str, list[int]]  # model -> its row for each output id, -1 where it lacks the token
    original: dict[str, dict[str, int]]  # model -> its own token ids
    tokens: dict[str, TokenEmbedding]  # the recipe's `tokens:`
    folder: Path  # the tokenizer folder it started from
    changed: bool  # tokens were added: the tokenizer is written anew, not copied from `folder`
    _sources: dict[tuple, dict] = field(default_factory=dict, repr=False)

    def rows(self, tensors: dict[str, "torch.Tensor"], base: str | None, axis: int = 0) -> dict[str, "torch.Tensor"]:
        """Each input's matrix re-indexed to the output vocabulary (mergekit's PermutedVocabulary)."""
        import torch

        models = list(tensors)
        views = {m: t.movedim(axis, 0) for m, t in tensors.items()}
        dtype = views[models[0]].dtype
        for v in views.values():
            dtype = torch.promote_types(dtype, v.dtype)
        configs = self._token_sources(tuple(models), base)
        defaults = self._default_rows(views, configs, dtype)
        n = len(self.vocab)
        out = {}
        for m in models:
            perm = torch.tensor(self.permutations[m])
            keep = perm >= 0
            for token, cfg in configs.items():
                if cfg is not None and cfg.force:
                    keep[self.vocab[token]] = False
            new = torch.zeros((self.size, *views[m].shape[1:]), dtype=dtype, device=views[m].device)
            ids = torch.nonzero(keep).flatten()
            new[ids] = views[m][perm[ids]].to(dtype)
            for token, row in defaults.items():
                if not keep[self.vocab[token]]:
                    new[self.vocab[token]] = row
            if self.size > n:
                new[n:] = torch.mean(new[:n], dim=0)
            out[m] = new.movedim(0, axis)
        return out

    def _token_sources(self, models: tuple[str, ...], base: str | None) -> dict[str, TokenEmbedding]:
        """The recipe's token sources, plus mergekit's defaults for tokens some input lacks (the only
        input that has it, else the base; None marks a token whose row is the mean)."""
        key = (models, base)
        if key in self._sources:
            return self._sources[key]
        configs: dict[str, TokenEmbedding | None] = dict(self.tokens)
        perms = [self.permutations[m] for m in models]
        for token, i in self.vocab.items():
            if token in configs:
                continue
            present = [p[i] >= 0 for p in perms]
            if all(present):
                continue  # no default row needed: every input has it
            if sum(present) == 1:
                configs[token] = TokenEmbedding(source=models[present.index(True)])
            elif not any(present):
                configs[token] = TokenEmbedding(source=ZeroSource(kind="zero"))
            elif base in models and self.permutations[base][i] >= 0:
                configs[token] = TokenEmbedding(source=base)
            else:
                configs[token] = None  # averaged
        self._sources[key] = configs
        return configs

    def _default_rows(self, views: dict[str, "torch.Tensor"], configs: dict, dtype) -> dict[str, "torch.Tensor"]:
        import torch

        models = list(views)
        first = views[models[0]]
        rows = {}
        for token, i in self.vocab.items():
            cfg = configs.get(token)
            if not (cfg is not None and cfg.force) and all(self.permutations[m][i] >= 0 for m in models):
                continue
            if token in configs and cfg is None:  # the mean of the inputs that have it, in input order
                row, count = torch.zeros(first.shape[1:], dtype=dtype, device=first.device), 0
                for m in models:
                    if self.permutations[m][i] >= 0:
                        row = row + views[m][self.permutations[m][i]]
                        count += 1
                rows[token] = row / count
            elif cfg is not None:
                rows[token] = self._source_row(token, i, cfg, views)
        return rows

    def _source_row(self, token: str, i: int, cfg: TokenEmbedding, views: dict[str, "torch.Tensor"]):
        src = cfg.source
        if isinstance(src, ZeroSource):
            first = next(iter(views.values()))
            return first.new_zeros(first.shape[1:])
        model = src.model if isinstance(src, ModelTokenSource) else src
        if isinstance(src, ModelTokenSource):
            j = src.token_id if src.token_id is not None else self.original[model][src.token]
            return views[model][j]
        return views[model][self.permutations[model][i]]


def build_vocabulary(recipe: MergeRecipe, sources: "Sources", folder_of: Callable[[str], Path]) -> Vocabulary:
    """The output vocabulary a recipe asks for (`recipe.tokenizer_choice` is set). `folder_of(model)`
    is the tokenizer folder of a model that only gives the tokenizer (`tokenizer_source: ORG/NAME`)."""
    models = recipe.referenced_models()
    base = recipe.base_model or models[0]
    own = {m: _load(sources.path(m), m, recipe) for m in models}
    own = {m: tok if tok is not None else own[base] for m, tok in own.items()}
    if own[base] is None:
        raise CheckpointError(f"model {base!r} has no tokenizer, which the output vocabulary starts from",
                              where=recipe.model_fields_paths().get(base), fix="add its tokenizer files")
    sizes = {m: int(sources.config(m).get("vocab_size") or len(own[m].get_vocab())) for m in models}
    _check_ids(own[base], sizes[base], base, recipe)
    choice = recipe.tokenizer_choice
    if choice in ("union", "base"):
        folder, initial = sources.path(base), len(own[base].get_vocab())
        out = _union(own, sizes, base, sources) if choice == "union" else _load(folder, base, recipe)
    else:
        folder = folder_of(choice)
        out = _load(folder, choice, recipe)
        if out is None:
            raise CheckpointError(f"no tokenizer in {folder}", where=_choice_field(recipe),
                                  fix="give base, union, or a model whose folder holds a tokenizer")
        initial = len(out.get_vocab())
    spec = recipe.tokenizer
    for token in (spec.tokens or {}) if spec else {}:
        if token not in out.get_vocab():
            out.add_tokens(token)
    vocab = out.get_vocab()
    return _finish(recipe, out, vocab, own, sizes, folder, changed=len(vocab) != initial)


def _finish(recipe: MergeRecipe, out, vocab: dict[str, int], own: dict, sizes: dict, folder: Path, *,
            changed: bool) -> Vocabulary:
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise CheckpointError("the output tokenizer's ids have gaps", where=_choice_field(recipe),
                              fix="use a tokenizer whose ids run from 0 without gaps")
    n = len(vocab)
    spec = recipe.tokenizer
    size = n
    if spec is not None and spec.pad_to_multiple_of and n % spec.pad_to_multiple_of:
        size = (n // spec.pad_to_multiple_of + 1) * spec.pad_to_multiple_of
    by_id = sorted(vocab, key=vocab.get)
    perms = {}
    for m, tok in own.items():
        theirs = tok.get_vocab()
        perms[m] = [theirs[t] if t in theirs and theirs[t] < sizes[m] else -1 for t in by_id]
    voc = Vocabulary(tokenizer=out, vocab=vocab, size=size, permutations=perms,
                     original={m: tok.get_vocab() for m, tok in own.items()},
                     tokens=dict((spec.tokens or {}) if spec else {}), folder=folder, changed=changed)
    _check_token_sources(recipe, voc)
    return voc


def _union(own: dict, sizes: dict, base: str, sources: "Sources"):
    """The base's tokenizer plus every token of the other models it lacks (mergekit's union)."""
    out = _load(sources.path(base), base, None)
    base_vocab = own[base].get_vocab()
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for m in [base, *[m for m in own if m != base]]:
        tok = own[m]
        for token, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < sizes[m]:
                plain.setdefault(token, None)
        for i, info in tok.added_tokens_decoder.items():
            if i < sizes[m]:
                added.setdefault(info.content, info)
    for token in plain:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def _load(folder: Path, model: str, recipe: MergeRecipe | None):
    """A tokenizer folder's fast tokenizer, or None when the folder has no tokenizer files."""
    from evomerge.engine.output import TOKENIZER_FILES

    if not any((Path(folder) / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as exc:  # transformers raises many kinds for a broken tokenizer
        where = recipe.model_fields_paths().get(model) if recipe is not None else str(folder)
        raise CheckpointError(f"cannot load the tokenizer of {model!r} ({type(exc).__name__}: {exc})", where=where,
                              fix="repair or re-download its tokenizer files") from None


def _check_ids(tok, size: int, model: str, recipe: MergeRecipe) -> None:
    beyond = [t for t, i in tok.get_vocab().items() if i >= size]
    if beyond:
        raise CheckpointError(f"the tokenizer of {model!r} has {len(beyond)} token(s) beyond its {size} embedding rows "
                              f"(e.g. {beyond[0]!r})", where=recipe.model_fields_paths().get(model),
                              fix="use a checkpoint whose embeddings cover its tokenizer")


def _choice_field(recipe: MergeRecipe) -> str:
    return "tokenizer.source" if recipe.tokenizer is not None else "tokenizer_source"


def _check_token_sources(recipe: MergeRecipe, voc: Vocabulary) -> None:
    """Every `tokens:` entry can give its row (mergekit fails mid-merge where these do not hold)."""
    for token, spec in voc.tokens.items():
        where = f"tokenizer.tokens[{token!r}].source"
        src = spec.source
        model = src.model if isinstance(src, ModelTokenSource) else src if isinstance(src, str) else None
        missing = any(p[voc.vocab[token]] < 0 for p in voc.permutations.values())
        if src is None and (missing or spec.force):
            raise ConfigError(f"token {token!r} is missing from some input model, so its row needs a source",
                              where=where, fix="give source: a model, {kind: zero}, or {kind: model_token, model: M, "
                                               "token: T}")
        if model is None:
            continue
        if model not in voc.permutations:
            raise ConfigError(f"token {token!r} takes its row from {model!r}, which is not merged", where=where,
                              fix="name one of the recipe's models")
        if isinstance(src, ModelTokenSource):
            if src.token is not None and src.token not in voc.original[model]:
                raise ConfigError(f"{model!r} has no token {src.token!r}", where=f"{where}.token",
                                  fix="name a token of that model's tokenizer")
            if src.token_id is not None and not 0 <= src.token_id < len(voc.original[model]):
                raise ConfigError(f"token_id {src.token_id} is out of range for {model!r}", where=f"{where}.token_id",
                                  fix=f"use an id in [0, {len(voc.original[model])})")
        elif voc.permutations[model][voc.vocab[token]] < 0:
            raise ConfigError(f"{model!r} has no token {token!r} to give its row", where=where,
                              fix="use {kind: model_token, model: M, token: T} to take another token's row")


__all__ = ["Vocabulary", "build_vocabulary"]
