"""Carving by content hash (evomerge/evaluation/splits.py): deterministic, disjoint, order-free,
stable under appends, duplicates never straddle, fractions respected; the few-shot pool is search-only."""

from __future__ import annotations

import random

import pytest

from evomerge.evaluation import splits
from evomerge.evaluation.protocol import Carve, ScoringProtocol, differences

FR = {"search": 0.6, "select": 0.2, "report": 0.2}


def items(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 8)))
        out.append(splits.content_key(f"up {word}{i}=", f"{word.upper()}{i}"))
    return out


def assignment(c: splits.Carving) -> dict[str, str]:
    return {c.keys[i]: role for role, idx in c.indices.items() for i in idx}


def test_carving_is_deterministic_disjoint_and_complete():
    keys = items(2000)
    a, b = splits.carve(keys, FR, seed=0), splits.carve(keys, FR, seed=0)
    assert a == b
    sets = [set(a.indices[r]) for r in splits.ROLES]
    assert sum(len(s) for s in sets) == len(keys) and set().union(*sets) == set(range(len(keys)))
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    # fractions respected (binomial: 2000 * 0.2 = 400 +- 18 sd)
    assert 1130 < len(sets[0]) < 1270 and 330 < len(sets[1]) < 470 and 330 < len(sets[2]) < 470
    assert splits.carve(keys, FR, seed=1) != a  # the seed is the key of the hash


def test_carving_does_not_depend_on_order_and_is_stable_when_items_are_appended():
    keys = items(500)
    base = assignment(splits.carve(keys, FR, 0))
    shuffled = keys[:]
    random.Random(3).shuffle(shuffled)
    assert assignment(splits.carve(shuffled, FR, 0)) == base
    grown = assignment(splits.carve(keys + items(300, seed=9), FR, 0))
    assert all(grown[k] == role for k, role in base.items())


def test_duplicates_never_straddle_two_splits():
    keys = items(300)
    dup = keys + [k for k in keys[:100]] + [splits.content_key("  UP  " + k[2:20], "x") for k in keys[:5]]
    c = splits.carve(dup, FR, 0)
    where = {}
    for role, idx in c.indices.items():
        for i in idx:
            assert where.setdefault(c.keys[i], role) == role


def test_normalization_and_multiple_choice_targets():
    assert splits.normalize("  Héllo\tWORLD \n") == "héllo world"
    assert splits.content_key("Q:  What?", "B") == splits.content_key("q: what?", "b")
    # a target given as an index into the choices is the same item as the choice itself
    assert splits.content_key("Q", 1, ["a", "b"]) == splits.content_key("Q", "b", ["a", "b"])
    assert splits.content_key("Q", 0, ["a", "b"]) != splits.content_key("Q", 1, ["a", "b"])


def test_fewshot_pool_comes_from_search_only_and_leaves_it():
    keys = items(400)
    c = splits.carve(keys, FR, 0)
    p = splits.fewshot_pool(c, 12, 0)
    assert len(p.fewshot) == 12
    assert set(p.fewshot) <= set(c.indices["search"])
    assert not set(p.fewshot) & set(p.indices["search"])
    assert p.indices["select"] == c.indices["select"] and p.indices["report"] == c.indices["report"]
    assert splits.fewshot_pool(c, 12, 0) == p


def test_ids_hash_names_the_items_not_their_order():
    keys = items(200)
    a = splits.carve(keys, FR, 0)
    b = splits.carve(list(reversed(keys)), FR, 0)
    assert all(a.ids_hash(r) == b.ids_hash(r) for r in splits.ROLES)
    assert a.ids_hash("search") != a.ids_hash("report")


def test_protocol_models_refuse_bad_values():
    with pytest.raises(ValueError, match="sum to 1.1"):
        Carve(search=0.7, select=0.2, report=0.2)
    with pytest.raises(ValueError, match="fewshot_as_multiturn needs apply_chat_template"):
        ScoringProtocol(fewshot_as_multiturn=True)
    with pytest.raises(ValueError):
        ScoringProtocol(num_fewshot=-1)
    assert differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 0}) == [
        "b.c: 2 -> 3", "d: '<absent>' -> 0"]
