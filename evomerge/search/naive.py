"""The naive references: the simple merges every search result should be compared with.

Why it exists: a searched recipe is only worth its cost if it beats what a user would try first. The
report scores uniform linear, slerp at t = 0.5, TIES at mergekit's defaults, and task arithmetic with
lambda tuned on the search split (the strongest simple baseline in the literature) beside the winner
(`suggest.naive_recipes` builds them; `selection.select_and_report` asks for them with evidence on).
"""

from __future__ import annotations

from evomerge.search.candidates import Candidate, Scorer
from evomerge.search.loop import recipe_key

NAIVE_ATTR = "naive_search_scores"  # study user attr: {label: {"score": ...}} of the naive lambda grid, search split


def naive_candidates(study, scorer: Scorer, taken: list[Candidate]) -> list[Candidate]:
    """The simple merges every result should be compared with (suggest.naive_recipes), not already among
    the report's candidates; task arithmetic's lambda is tuned on the search split first (cached)."""
    from evomerge.search.suggest import naive_recipes

    fixed, grid = naive_recipes(scorer.space)
    if grid:
        cache = dict(study.user_attrs.get(NAIVE_ATTR, {}))
        cands = [Candidate(label, None, recipe) for label, recipe in grid]
        scorer.score(cands, "search", cache, lambda c: c.label, tag="naive", desc="naive (search)")
        study.set_user_attr(NAIVE_ATTR, cache)
        scored = [c for c in cands if cache[c.label].get("score") is not None]
        if scored:
            best = max(scored, key=lambda c: cache[c.label]["score"])
            fixed.append(("naive:task_arithmetic (lambda tuned on search)", best.recipe))
    seen = {recipe_key(c.recipe.to_dict()) for c in taken}
    out = []
    for label, recipe in fixed:
        k = recipe_key(recipe.to_dict())
        if k not in seen:
            seen.add(k)
            out.append(Candidate(label, None, recipe))
    return out
