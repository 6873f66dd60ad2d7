"""evaluation/stats.py against independent computations on fixed data.

- McNemar: the exact binomial two-sided p-value, summed by hand from binomial coefficients.
- Intervals: a plain numpy stratified bootstrap (written here, not scipy) agrees within Monte Carlo
  error, and a normal-approximation interval agrees in width for a large sample.
- Paired: the point difference is the hand-computed mixture difference; identical models give 0 with
  p = 1; a clear winner gets a tiny p.
- AUROC: the pairwise definition counted by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.evaluation import stats


def _hand_binom_two_sided(k: int, n: int) -> float:
    probs = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
    return min(1.0, sum(p for p in probs if p <= probs[k] * (1 + 1e-9)))


def test_mcnemar_equals_the_exact_binomial():
    # 10 items where a is right and b wrong, 3 the other way, 20 concordant
    a = [1] * 10 + [0] * 3 + [1] * 12 + [0] * 8
    b = [0] * 10 + [1] * 3 + [1] * 12 + [0] * 8
    res = stats.paired({"t": a}, {"t": b}, {"t": 1.0})
    assert (res.wins, res.losses) == (10, 3)
    assert res.p_mcnemar == pytest.approx(_hand_binom_two_sided(10, 13), rel=1e-9)
    assert res.delta.point == pytest.approx((10 - 3) / 33)


def test_non_binary_scores_have_no_mcnemar():
    res = stats.paired({"t": [0.5, 1.0, 0.2]}, {"t": [0.1, 0.3, 0.2]}, {"t": 1.0})
    assert res.p_mcnemar is None and res.wins == 2 and res.losses == 0


def _numpy_bootstrap(items, weights, iters=4000, seed=1):
    rng = np.random.default_rng(seed)
    total = sum(weights.values())
    draws = np.zeros(iters)
    for t, v in items.items():
        v = np.asarray(v, float)
        idx = rng.integers(0, len(v), size=(iters, len(v)))
        draws += weights[t] / total * v[idx].mean(axis=1)
    return np.percentile(draws, [2.5, 97.5])


def test_mixture_interval_agrees_with_an_independent_bootstrap_and_the_normal_approximation():
    rng = np.random.default_rng(3)
    items = {"a": (rng.random(300) < 0.7).astype(float).tolist(), "b": (rng.random(200) < 0.4).astype(float).tolist()}
    weights = {"a": 2.0, "b": 1.0}
    ci = stats.mixture_ci(items, weights)
    want = (2 * np.mean(items["a"]) + np.mean(items["b"])) / 3
    assert ci.point == pytest.approx(want)
    low, high = _numpy_bootstrap(items, weights)
    assert ci.low == pytest.approx(low, abs=0.006) and ci.high == pytest.approx(high, abs=0.006)
    pa, pb = np.mean(items["a"]), np.mean(items["b"])
    se = math.sqrt((2 / 3) ** 2 * pa * (1 - pa) / 300 + (1 / 3) ** 2 * pb * (1 - pb) / 200)
    assert (ci.high - ci.low) == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert ci.low < ci.point < ci.high


def test_paired_identical_and_clear_difference():
    items = {"t": [1, 0, 1, 1, 0, 1, 0, 0, 1, 1] * 5}
    same = stats.paired(items, items, {"t": 1})
    assert same.delta.point == 0 and same.p_bootstrap == 1.0 and same.p_mcnemar == 1.0
    better = {"t": [1] * 50}
    res = stats.paired(better, items, {"t": 1})
    assert res.delta.point == pytest.approx(0.4) and res.delta.low > 0.2 and res.p_bootstrap < 0.01
    assert res.p_mcnemar == pytest.approx(_hand_binom_two_sided(20, 20))
    with pytest.raises(ValueError, match="same items"):
        stats.paired({"t": [1, 0]}, {"t": [1]}, {"t": 1})


def test_auroc_is_the_pairwise_probability():
    members, others = [0.9, 0.8, 0.4, 0.7], [0.1, 0.4, 0.5]
    pairs = [(m > o) + 0.5 * (m == o) for m in members for o in others]
    assert stats.auroc(members, others) == pytest.approx(sum(pairs) / len(pairs))
    assert stats.auroc([1, 2], [1, 2]) == pytest.approx(0.5)
