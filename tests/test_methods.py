"""Oracle tests for the merge methods: hand-computed values, an independent numpy reference, and a
cross-check against mergekit 0.1.5's own functions (marked `mergekit`)."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from evomerge.engine import methods
from evomerge.errors import CheckpointError, ConfigError
from evomerge.engine.methods.arithmetic import (
    bernoulli_drop,
    magnitude_keep_mask,
    magnitude_trim,
    sign_election_mask,
)

T = torch.tensor


def merge(name, tensors, base=None, model_params=None, global_params=None, generator=None):
    return methods.get(name).merge(
        tensors, base, model_params or {}, global_params or {}, generator=generator
    )


# ---------------------------------------------------------------- registry


def test_registry_names_and_lookup():
    """Every method mergekit 0.1.5 registers, and no other."""
    assert methods.names()[:7] == ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                                   "passthrough")
    assert set(methods.names()) == {
        "linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "passthrough",
        "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "nuslerp", "multislerp",
        "karcher", "sce", "nearswap", "ram", "ramplus_tl", "arcee_fusion"}
    for name in methods.names():
        assert methods.get(name).name == name


@pytest.mark.parametrize(
    "typo, suggestion", [("tie", "ties"), ("dare-ties", "dare_ties"), ("slrep", "slerp"), ("Linear", "linear")]
)
def test_registry_did_you_mean(typo, suggestion):
    with pytest.raises(ConfigError) as info:
        methods.get(typo)
    err = info.value
    assert err.where == "merge_method"
    assert f"did you mean {suggestion!r}" in err.fix
    assert repr(typo) in err.what


def test_registry_unknown_without_close_match_lists_methods():
    with pytest.raises(ConfigError) as info:
        methods.get("frobnicate")
    assert "did you mean" not in info.value.fix
    assert "task_arithmetic" in info.value.fix


# ---------------------------------------------------------------- linear


def test_linear_weighted_average_by_hand():
    x = T([1.0, 2.0, 3.0])
    y = T([3.0, 6.0, -3.0])
    out = merge("linear", {"x": x, "y": y}, None, {"x": {"weight": 1.0}, "y": {"weight": 3.0}})
    assert torch.equal(out, T([2.5, 5.0, -1.5]))
    out = merge(
        "linear",
        {"x": x, "y": y},
        None,
        {"x": {"weight": 1.0}, "y": {"weight": 3.0}},
        {"normalize": False},
    )
    assert torch.equal(out, T([10.0, 20.0, -6.0]))


def test_linear_base_is_an_ordinary_input():
    x = T([[2.0, 4.0]])
    y = T([[6.0, 0.0]])
    params = {"x": {"weight": 1.0}, "y": {"weight": 1.0}}
    assert torch.equal(merge("linear", {"x": x, "y": y}, "x", params), T([[4.0, 2.0]]))


def test_linear_accumulates_in_float32_and_casts_back():
    # 1 + 2**-9 is not representable in bfloat16 (8 bits of mantissa), but the float32 sum of two
    # bf16 values is exact before the single final rounding.
    x = T([1.0, 256.0], dtype=torch.bfloat16)
    y = T([1.0078125, 258.0], dtype=torch.bfloat16)  # exactly representable
    out = merge("linear", {"x": x, "y": y}, None, {"x": {"weight": 0.5}, "y": {"weight": 0.5}})
    assert out.dtype == torch.bfloat16
    expected = ((x.float() * 0.5 + y.float() * 0.5) / 1.0).to(torch.bfloat16)
    assert torch.equal(out, expected)


def test_linear_divides_by_the_float32_weight_sum():
    # sum of weights 1.2 rounds to 1.203125 in bfloat16; mergekit divides in float32
    x = T([3.0], dtype=torch.bfloat16)
    out = merge("linear", {"x": x, "y": x}, None, {"x": {"weight": 0.6}, "y": {"weight": 0.6}})
    expected = (x.float() * torch.tensor(0.6) * 2 / (torch.tensor(0.6) + torch.tensor(0.6))).bfloat16()
    assert torch.equal(out, expected) and torch.equal(out, x)


def test_linear_zero_weight_sum_is_a_config_error():
    x, y = T([1.0]), T([2.0])
    with pytest.raises(ConfigError, match="sum to zero"):
        merge("linear", {"x": x, "y": y}, None, {"x": {"weight": 1.0}, "y": {"weight": -1.0}})
    out = merge(
        "linear", {"x": x, "y": y}, None, {"x": {"weight": 1.0}, "y": {"weight": -1.0}}, {"normalize": False}
    )
    assert torch.equal(out, T([-1.0]))


def test_linear_requires_weight():
    with pytest.raises(ConfigError) as info:
        merge("linear", {"x": T([1.0]), "y": T([2.0])}, None, {"x": {"weight": 1.0}})
    assert "weight" in info.value.what and "'y'" in info.value.what


# ---------------------------------------------------------------- slerp


def test_slerp_orthogonal_unit_vectors_halfway():
    out = merge("slerp", {"a": T([1.0, 0.0]), "b": T([0.0, 1.0])}, "a", {}, {"t": 0.5})
    half = math.sqrt(2) / 2
    torch.testing.assert_close(out, T([half, half]), rtol=0, atol=1e-7)


def test_slerp_interpolates_raw_vectors_not_normalised_ones():
    # theta = pi/2 from the normalised copies; coefficients sin(pi/4)/sin(pi/2) on the raw vectors.
    out = merge("slerp", {"a": T([2.0, 0.0]), "b": T([0.0, 3.0])}, "a", {}, {"t": 0.5})
    torch.testing.assert_close(out, T([math.sqrt(2), 1.5 * math.sqrt(2)]), rtol=1e-6, atol=0)


def test_slerp_treats_the_whole_tensor_as_one_vector():
    # Flattened: a=[1,0,1,0], b=[0,1,1,0]: cos = 1/2, theta = pi/3, both coefficients
    # sin(pi/6)/sin(pi/3) = 1/sqrt(3). Row by row the second rows would be identical (-> [1, 0]).
    a = T([[1.0, 0.0], [1.0, 0.0]])
    b = T([[0.0, 1.0], [1.0, 0.0]])
    out = merge("slerp", {"a": a, "b": b}, "a", {}, {"t": 0.5})
    r = 1 / math.sqrt(3)
    torch.testing.assert_close(out, T([[r, r], [2 * r, 0.0]]), rtol=1e-6, atol=1e-7)


def test_slerp_endpoints_are_exact_and_base_is_t0():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 7, generator=g)
    b = torch.randn(5, 7, generator=g)
    # the base is named second: t=0 must give the base, wherever it sits in the dict
    assert torch.equal(merge("slerp", {"a": a, "b": b}, "b", {}, {"t": 0.0}), b)
    assert torch.equal(merge("slerp", {"a": a, "b": b}, "b", {}, {"t": 1.0}), a)
    assert torch.equal(merge("slerp", {"a": a, "b": b}, "a", {}, {"t": 0.0}), a)


@pytest.mark.parametrize("factor", [2.0, -3.0])
def test_slerp_colinear_and_antipodal_fall_back_to_linear(factor):
    a = T([1.0, 2.0, -1.0])
    b = a * factor
    out = merge("slerp", {"a": a, "b": b}, "a", {}, {"t": 0.25})
    torch.testing.assert_close(out, 0.75 * a + 0.25 * b, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(out).all()


def test_slerp_colinearity_threshold_is_0_9995():
    # cos(theta) = 0.995 < 0.9995: true slerp, the midpoint stays on the unit circle
    theta = math.acos(0.995)
    b = T([math.cos(theta), math.sin(theta)])
    out = merge("slerp", {"a": T([1.0, 0.0]), "b": b}, "a", {}, {"t": 0.5})
    torch.testing.assert_close(out, T([math.cos(theta / 2), math.sin(theta / 2)]), rtol=0, atol=2e-7)
    # cos(theta) = 0.9997 > 0.9995: the linear fallback, a chord midpoint
    theta = math.acos(0.9997)
    b = T([math.cos(theta), math.sin(theta)])
    out = merge("slerp", {"a": T([1.0, 0.0]), "b": b}, "a", {}, {"t": 0.5})
    torch.testing.assert_close(out, (T([1.0, 0.0]) + b) / 2, rtol=0, atol=1e-8)


def test_slerp_zero_vector_uses_unit_norm_guard():
    # |a| = 0 <= eps: norm replaced by 1, dot = 0 -> theta = pi/2, coefficient of b = sin(t pi/2)
    a = torch.zeros(3)
    b = T([0.0, 3.0, 4.0])
    out = merge("slerp", {"a": a, "b": b}, "a", {}, {"t": 0.5})
    torch.testing.assert_close(out, b * math.sin(math.pi / 4), rtol=1e-6, atol=0)


def _numpy_slerp(t, a, b, threshold=0.9995, eps=1e-8):
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = float(np.clip(np.dot(a / na, b / nb), -1, 1))
    if abs(dot) > threshold:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


@pytest.mark.parametrize("t", [0.1, 0.37, 0.9])
def test_slerp_matches_independent_numpy_reference(t):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(16, 9)).astype(np.float32)
    b = (0.3 * a + rng.normal(size=(16, 9))).astype(np.float32)
    out = merge("slerp", {"a": torch.from_numpy(a), "b": torch.from_numpy(b)}, "a", {}, {"t": t})
    np.testing.assert_allclose(out.numpy().ravel(), _numpy_slerp(t, a, b), rtol=2e-5, atol=2e-6)


def test_slerp_bfloat16_works_in_float32_and_casts_back():
    rng = np.random.default_rng(4)
    a = torch.from_numpy(rng.normal(size=50).astype(np.float32)).to(torch.bfloat16)
    b = torch.from_numpy(rng.normal(size=50).astype(np.float32)).to(torch.bfloat16)
    out = merge("slerp", {"a": a, "b": b}, "a", {}, {"t": 0.4})
    assert out.dtype == torch.bfloat16
    ref = torch.from_numpy(_numpy_slerp(0.4, a.float().numpy(), b.float().numpy())).to(torch.bfloat16)
    assert (out.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()


def test_slerp_needs_exactly_two_models_and_a_base():
    x = T([1.0, 0.0])
    with pytest.raises(ConfigError, match="exactly 2"):
        merge("slerp", {"a": x, "b": x, "c": x}, "a", {}, {"t": 0.5})
    with pytest.raises(ConfigError) as info:
        merge("slerp", {"a": x, "b": x}, None, {}, {"t": 0.5})
    assert info.value.where == "base_model"
    with pytest.raises(ConfigError, match="'t'"):
        merge("slerp", {"a": x, "b": x}, "a", {}, {})


# ---------------------------------------------------------------- task arithmetic


def _ta_inputs():
    base = T([1.0, 1.0, 1.0, 1.0])
    m1 = T([2.0, 0.0, 1.0, 3.0])  # delta [1, -1, 0, 2]
    m2 = T([1.0, 3.0, -1.0, 1.0])  # delta [0, 2, -2, 0]
    return {"base": base, "m1": m1, "m2": m2}, {"m1": {"weight": 0.5}, "m2": {"weight": 1.0}}


def test_task_arithmetic_by_hand():
    tensors, params = _ta_inputs()
    # 0.5*d1 + d2 = [0.5, 1.5, -2, 1]; lambda 2 -> base + [1, 3, -4, 2]
    out = merge("task_arithmetic", tensors, "base", params, {"lambda": 2.0})
    assert torch.equal(out, T([2.0, 4.0, -3.0, 3.0]))
    # normalize defaults to false; with it the sum is divided by 1.5 before lambda
    out = merge("task_arithmetic", tensors, "base", params, {"lambda": 2.0, "normalize": True})
    torch.testing.assert_close(out, 1 + T([0.5, 1.5, -2.0, 1.0]) / 1.5 * 2)


def test_task_arithmetic_ignores_base_params_and_density():
    tensors, params = _ta_inputs()
    params = {**params, "base": {"weight": 100.0}}
    params["m1"]["density"] = 0.25  # accepted (mergekit does) but unused without sparsification
    out = merge("task_arithmetic", tensors, "base", params)
    assert torch.equal(out, T([1.5, 2.5, -1.0, 2.0]))


def test_normalize_with_weights_summing_to_zero_divides_by_one():
    # mergekit: a |sum of weights| below 1e-8 is replaced by 1 (no division by zero)
    tensors, _ = _ta_inputs()
    params = {"m1": {"weight": 1.0}, "m2": {"weight": -1.0}}
    for name in ("task_arithmetic", "dare_linear"):
        out = merge(name, tensors, "base", params, {"normalize": True})
        assert torch.equal(out, 1 + T([1.0, -1.0, 0.0, 2.0]) - T([0.0, 2.0, -2.0, 0.0])), name


def test_task_arithmetic_requires_a_base():
    tensors, params = _ta_inputs()
    with pytest.raises(ConfigError) as info:
        merge("task_arithmetic", tensors, None, params)
    assert info.value.where == "base_model"


def test_task_arithmetic_base_only_returns_base():
    base = T([1.0, -2.0])
    assert torch.equal(merge("task_arithmetic", {"base": base}, "base"), base)


# ---------------------------------------------------------------- ties


def _ties_inputs():
    base = torch.ones(6)
    d1 = T([3.0, -1.0, 0.5, -4.0, 2.0, 0.1])
    d2 = T([-2.0, -3.0, 1.0, 1.5, 0.2, 0.3])
    tensors = {"base": base, "m1": base + d1, "m2": base + d2}
    params = {"m1": {"weight": 1.0, "density": 0.5}, "m2": {"weight": 0.5, "density": 0.5}}
    return tensors, params


def test_ties_trim_elect_disjoint_mean_worked_example():
    # k = int(0.5 * 6) = 3.  trim: d1 -> [3, 0, 0, -4, 2, 0]; d2 -> [-2, -3, 0, 1.5, 0, 0]
    # weighted: w1 d1 = [3, 0, 0, -4, 2, 0]; w2 d2 = [-1, -1.5, 0, 0.75, 0, 0]
    # elected sign of the sum [2, -1.5, 0, -3.25, 2, 0]: [+, -, +, -, +, +]
    # agreeing: m1 at {0, 3, 4}, m2 at {1}; mixed = [3, -1.5, 0, -4, 2, 0]
    # divisor (sum of agreeing weights, 0 -> 1) = [1, 0.5, 1, 1, 1, 1]
    tensors, params = _ties_inputs()
    out = merge("ties", tensors, "base", params)  # normalize defaults to TRUE for ties
    assert torch.equal(out, 1 + T([3.0, -3.0, 0.0, -4.0, 2.0, 0.0]))
    out = merge("ties", tensors, "base", params, {"normalize": False})
    assert torch.equal(out, 1 + T([3.0, -1.5, 0.0, -4.0, 2.0, 0.0]))
    out = merge("ties", tensors, "base", params, {"lambda": 0.5, "int8_mask": True})
    assert torch.equal(out, 1 + 0.5 * T([3.0, -3.0, 0.0, -4.0, 2.0, 0.0]))


def test_ties_rescale_matches_l1_norm_of_each_trimmed_task_vector():
    tensors, params = _ties_inputs()
    out = merge("ties", tensors, "base", params, {"rescale": True, "normalize": False})
    # d1 trimmed L1 = 9 of 10.6; d2 trimmed L1 = 6.5 of 8.0
    s1, s2 = 10.6 / 9.0, 8.0 / 6.5
    w1 = T([3.0, 0, 0, -4.0, 2.0, 0]) * s1
    w2 = T([-2.0, -3.0, 0, 1.5, 0, 0]) * s2 * 0.5
    elected = torch.where(w1 + w2 >= 0, 1.0, -1.0)
    mixed = w1 * (torch.sign(w1) == elected) + w2 * (torch.sign(w2) == elected)
    torch.testing.assert_close(out, 1 + mixed)


def test_ties_density_default_is_one_keeps_everything():
    tensors, params = _ties_inputs()
    for p in params.values():
        del p["density"]
    d1 = tensors["m1"] - 1
    d2 = (tensors["m2"] - 1) * 0.5
    elected = torch.where(d1 + d2 >= 0, 1.0, -1.0)
    m1, m2 = torch.sign(d1) == elected, torch.sign(d2) == elected
    expected = (d1 * m1 + d2 * m2) / torch.where((m1 * 1.0 + m2 * 0.5) == 0, 1.0, m1 * 1.0 + m2 * 0.5)
    torch.testing.assert_close(merge("ties", tensors, "base", params), 1 + expected)


def _numpy_ties(base, models, weights, densities, normalize=True, lam=1.0):
    deltas = []
    for m, w, d in zip(models, weights, densities):
        delta = m - base
        k = max(1, int(d * delta.size))
        keep = np.argsort(-np.abs(delta).ravel(), kind="stable")[:k]
        trimmed = np.zeros(delta.size)
        trimmed[keep] = delta.ravel()[keep]
        deltas.append(w * trimmed.reshape(delta.shape))
    deltas = np.stack(deltas)
    ws = np.array(weights).reshape(-1, *([1] * base.ndim)) * np.ones_like(deltas)
    elected = np.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(deltas) == elected
    mixed = (deltas * agree).sum(0)
    divisor = (ws * agree).sum(0)
    divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def test_ties_matches_independent_numpy_reference():
    rng = np.random.default_rng(7)
    base = rng.normal(size=(12, 10))
    models = [base + rng.normal(size=base.shape) for _ in range(3)]
    weights, densities = [0.7, 0.3, 1.1], [0.3, 0.55, 0.8]
    tensors = {"base": torch.from_numpy(base)}
    params = {}
    for i, (m, w, d) in enumerate(zip(models, weights, densities)):
        tensors[f"m{i}"] = torch.from_numpy(m)
        params[f"m{i}"] = {"weight": w, "density": d}
    out = merge("ties", tensors, "base", params, {"lambda": 0.8})
    assert out.dtype == torch.float64
    ref = _numpy_ties(base, models, weights, densities, lam=0.8)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_magnitude_keep_mask_tie_breaking_modes():
    w = T([5.0, 1.0, 3.0, 3.0, 3.0, 0.5])
    # unambiguous cut: k=4 keeps 5.0 and all three 3.0s
    assert magnitude_keep_mask(w, 4).tolist() == [True, False, True, True, True, False]
    # ambiguous cut (k=2, three entries share 3.0): the fast mode keeps the lowest index
    fast = magnitude_keep_mask(w, 2, exact_ties=False)
    assert fast.tolist() == [True, False, True, False, False, False]
    exact = magnitude_keep_mask(w, 2)
    assert int(exact.sum()) == 2 and bool(exact[0]) and int(exact[2:5].sum()) == 1


def test_magnitude_trim_keeps_int_of_density_times_numel():
    d = T([6.0, -5.0, 4.0, -3.0, 2.0, 1.0])
    assert torch.equal(magnitude_trim(d, 0.6), T([6.0, -5.0, 4.0, 0.0, 0.0, 0.0]))  # int(3.6) = 3
    assert torch.equal(magnitude_trim(d, 0.99), T([6.0, -5.0, 4.0, -3.0, 2.0, 0.0]))  # int(5.94)


def test_magnitude_trim_edge_densities():
    d = T([1.0, -2.0, 3.0])
    assert magnitude_trim(d, 1.0) is d
    assert torch.equal(magnitude_trim(d, 0.0), torch.zeros(3))
    assert torch.equal(magnitude_trim(d, 0.1), T([0.0, 0.0, 3.0]))  # k = max(1, 0) = 1


def test_sign_election_zero_sum_elects_positive_and_zeros_never_count():
    deltas = T([[1.0, 0.0, -2.0], [-1.0, 0.0, 1.0]])
    mask = sign_election_mask(deltas)
    assert mask.tolist() == [[True, False, True], [False, False, False]]
    assert torch.equal(sign_election_mask(deltas, int8_mask=True), mask)


# ---------------------------------------------------------------- dare


def test_dare_drop_rate_statistics():
    n, density = 200_000, 0.3
    delta = torch.ones(n)
    g = torch.Generator().manual_seed(0)
    dropped = bernoulli_drop(delta, density, rescale=False, generator=g)
    kept = int((dropped != 0).sum())
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(kept / n - density) < 5 * sigma
    assert set(dropped.unique().tolist()) == {0.0, 1.0}
    # rescale: the kept entries are scaled so the L1 norm is unchanged (n / kept each)
    g = torch.Generator().manual_seed(0)
    rescaled = bernoulli_drop(delta, density, rescale=True, generator=g)
    assert torch.equal(rescaled != 0, dropped != 0)
    torch.testing.assert_close(rescaled.abs().sum(), torch.tensor(float(n)))
    torch.testing.assert_close(rescaled[rescaled != 0], torch.full((kept,), n / kept))


def test_dare_linear_consumes_generator_as_documented():
    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.normal(size=(30, 20)).astype(np.float32))
    m1 = base + torch.from_numpy(rng.normal(size=(30, 20)).astype(np.float32))
    m2 = base + torch.from_numpy(rng.normal(size=(30, 20)).astype(np.float32))
    m3 = base + 1.0
    tensors = {"base": base, "m1": m1, "m2": m2, "m3": m3}
    params = {
        "m1": {"weight": 0.6, "density": 0.4},
        "m2": {"weight": 0.9, "density": 0.7},
        "m3": {"weight": 0.2},  # density 1: draws nothing
    }
    out = merge(
        "dare_linear", tensors, "base", params, {"rescale": False}, torch.Generator().manual_seed(42)
    )
    # independent reconstruction: one bernoulli draw per model with density < 1, in input order
    g = torch.Generator().manual_seed(42)
    mask1 = torch.bernoulli(torch.full((30, 20), 0.4), generator=g)
    mask2 = torch.bernoulli(torch.full((30, 20), 0.7), generator=g)
    expected = base + (0.6 * (m1 - base) * mask1 + 0.9 * (m2 - base) * mask2 + 0.2 * (m3 - base))
    torch.testing.assert_close(out, expected)


def test_dare_density_one_draws_nothing():
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    x = torch.randn(10)
    merge("dare_ties", {"b": x, "m": x + 1}, "b", {"m": {"weight": 1.0}}, generator=g)
    assert torch.equal(g.get_state(), state)


def test_dare_seeded_determinism_and_seed_sensitivity():
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(9))
    tensors = {"b": x, "m1": x + torch.randn(64, 64), "m2": x - 0.5}
    params = {"m1": {"weight": 0.5, "density": 0.3}, "m2": {"weight": 0.5, "density": 0.6}}
    for name in ("dare_ties", "dare_linear"):
        one = merge(name, tensors, "b", params, generator=torch.Generator().manual_seed(5))
        two = merge(name, tensors, "b", params, generator=torch.Generator().manual_seed(5))
        other = merge(name, tensors, "b", params, generator=torch.Generator().manual_seed(6))
        assert torch.equal(one, two)
        assert not torch.equal(one, other)


def test_dare_defaults_rescale_true_normalize_false():
    for name in ("dare_ties", "dare_linear"):
        method = methods.get(name)
        assert method.tunable("rescale").default is True
        assert method.tunable("normalize").default is False
    assert methods.get("ties").tunable("normalize").default is True
    assert methods.get("ties").tunable("rescale").default is False
    assert methods.get("task_arithmetic").tunable("normalize").default is False
    assert methods.get("linear").tunable("normalize").default is True


def test_dare_ties_by_hand_with_full_density():
    # density 1 -> no drop; dare_ties is then TIES without trimming and without normalisation
    tensors, params = _ties_inputs()
    for p in params.values():
        p["density"] = 1.0
    d1 = T([3.0, -1.0, 0.5, -4.0, 2.0, 0.1])
    d2 = 0.5 * T([-2.0, -3.0, 1.0, 1.5, 0.2, 0.3])
    # sum = [2, -2.5, 1, -3.25, 2.1, 0.25] -> signs [+,-,+,-,+,+]
    expected = T([3.0, -1.0 - 1.5, 0.5 + 0.5, -4.0, 2.0 + 0.1, 0.1 + 0.15])
    torch.testing.assert_close(merge("dare_ties", tensors, "base", params), 1 + expected)


# ---------------------------------------------------------------- passthrough


def test_passthrough_copies_and_scales():
    x = T([1.0, -2.0, 4.0], dtype=torch.bfloat16)
    out = merge("passthrough", {"x": x})
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    out = merge("passthrough", {"x": x}, None, {"x": {"scale": 0.5}})
    assert out.dtype == torch.bfloat16 and torch.equal(out, T([0.5, -1.0, 2.0], dtype=torch.bfloat16))


def test_passthrough_takes_one_model():
    x = T([1.0])
    with pytest.raises(ConfigError, match="exactly 1"):
        merge("passthrough", {"x": x, "y": x})
    # with `models:` a base that is not listed is appended, so passthrough + base_model fails too
    with pytest.raises(ConfigError, match="exactly 1"):
        methods.get("passthrough").check_models(["x"], "base")


# ---------------------------------------------------------------- validation helpers


def test_tunable_check_ranges_and_paths():
    density = methods.get("ties").tunable("density")
    assert density.check(1, "x") == 1.0
    assert density.check(0.01, "x") == 0.01
    for bad in (0.0, 1.5, -0.1, float("nan"), float("inf"), "0.5", True):
        with pytest.raises(ConfigError) as info:
            density.check(bad, "models[1].parameters.density")
        assert info.value.where == "models[1].parameters.density"
        assert "(0, 1]" in info.value.fix
    t = methods.get("slerp").tunable("t")
    assert t.check(0, "t") == 0.0 and t.check(1, "t") == 1.0
    with pytest.raises(ConfigError, match="out of range"):
        t.check(1.01, "parameters.t")
    weight = methods.get("linear").tunable("weight")
    assert weight.check(-3.5, "w") == -3.5
    with pytest.raises(ConfigError, match="finite"):
        weight.check(float("-inf"), "w")
    normalize = methods.get("ties").tunable("normalize")
    assert normalize.check(False, "n") is False
    # mergekit's validation reads YAML's 1.0 / 0 / "yes" as bools for a bool parameter; so do we
    assert normalize.check(1.0, "n") is True and normalize.check(0, "n") is False and normalize.check("yes", "n") is True
    with pytest.raises(ConfigError, match="true or false"):
        normalize.check(0.5, "n")


def test_check_params_names_unknown_with_suggestion():
    ties = methods.get("ties")
    assert ties.check_params({"density": 0.5, "weight": 2}, "models[0].parameters") == {
        "density": 0.5,
        "weight": 2.0,
    }
    with pytest.raises(ConfigError) as info:
        ties.check_params({"densty": 0.5}, "models[0].parameters")
    assert info.value.where == "models[0].parameters.densty"
    assert "did you mean 'density'" in info.value.fix


def test_check_models_inputs_order_and_base_rules():
    ties = methods.get("ties")
    assert ties.check_models(["a", "b"], "base") == ["a", "b", "base"]
    assert ties.check_models(["base", "a"], "base") == ["base", "a"]
    with pytest.raises(ConfigError, match="not among the inputs"):
        ties.check_models(["a", "b"], "base", "slices[0].sources", append_base=False)
    with pytest.raises(ConfigError, match="listed twice"):
        ties.check_models(["a", "a"], "base")
    slerp = methods.get("slerp")
    assert slerp.check_models(["a"], "b") == ["a", "b"]
    with pytest.raises(ConfigError, match="exactly 2"):
        slerp.check_models(["a", "c"], "b")
    # linear: a base_model is just one more input (it then needs a weight too)
    assert methods.get("linear").check_models(["a"], "b") == ["a", "b"]
    assert methods.get("linear").params_for("b", "b")[0].name == "weight"
    assert methods.get("ties").params_for("b", "b") == ()


def test_non_float_buffers_are_copied_or_rejected():
    a = T([1, 2, 3])
    out = merge("linear", {"x": a, "y": a.clone()}, None, {"x": {"weight": 0.2}, "y": {"weight": 0.8}})
    assert torch.equal(out, a) and out.dtype == a.dtype
    with pytest.raises(CheckpointError, match="differs"):
        merge("linear", {"x": a, "y": a + 1}, None, {"x": {"weight": 0.2}, "y": {"weight": 0.8}})


def test_shape_mismatch_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="shapes disagree"):
        merge("linear", {"x": torch.zeros(2), "y": torch.zeros(3)}, None, {"x": {"weight": 1.0}, "y": {"weight": 1.0}})


def test_mixed_dtypes_are_promoted_like_mergekit():
    x = T([1.0, 2.0], dtype=torch.bfloat16)
    y = T([3.0, 4.0], dtype=torch.float32)
    out = merge("linear", {"x": x, "y": y}, None, {"x": {"weight": 1.0}, "y": {"weight": 1.0}})
    assert out.dtype == torch.float32 and torch.equal(out, T([2.0, 3.0]))


# ---------------------------------------------------------------- cross-check with mergekit

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _random_family(dtype, shape=(48, 40), n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base] + [base + 0.5 * torch.randn(shape, generator=g) for _ in range(n - 1)], dtype


@pytest.mark.mergekit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "method, extra",
    [
        ("task_arithmetic", {}),
        ("task_arithmetic", {"normalize": True, "lambda": 0.7}),
        ("ties", {}),
        ("ties", {"normalize": False, "rescale": True, "lambda": 1.3, "int8_mask": True}),
        ("dare_ties", {}),
        ("dare_ties", {"rescale": False, "normalize": True}),
        ("dare_linear", {}),
        ("dare_linear", {"rescale": False, "lambda": 0.5}),
    ],
)
def test_task_vector_methods_match_mergekit_bit_for_bit(dtype, method, extra):
    from mergekit.merge_methods import merge_tensors

    xs, _ = _random_family(dtype, n=4)
    xs = [x.to(dtype) for x in xs]
    weights, densities = [0.4, 0.9, -0.3], [0.5, 0.3, 0.8]
    torch.manual_seed(11)
    ref = merge_tensors(
        xs, method, parameters={"weight": weights, "density": densities, **extra}, base_index=0
    )
    names = ["base", "m1", "m2", "m3"]
    params = {n: {"weight": w, "density": d} for n, w, d in zip(names[1:], weights, densities)}
    out = merge(method, dict(zip(names, xs)), "base", params, extra, torch.Generator().manual_seed(11))
    assert out.dtype == ref.dtype == dtype
    assert torch.equal(out, ref)


@pytest.mark.mergekit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_mergekit_bit_for_bit(dtype, normalize):
    from mergekit.merge_methods import merge_tensors

    xs, _ = _random_family(dtype, n=3, seed=1)
    xs = [x.to(dtype) for x in xs]
    weights = [0.3, 0.5, 0.4]  # sum 1.2 is not a bfloat16/float16 number: the division is float32
    ref = merge_tensors(xs, "linear", parameters={"weight": weights, "normalize": normalize})
    params = {n: {"weight": w} for n, w in zip("abc", weights)}
    out = merge("linear", dict(zip("abc", xs)), None, params, {"normalize": normalize})
    assert torch.equal(out, ref)


@pytest.mark.mergekit
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_mergekit_bit_for_bit(dtype, t):
    from mergekit.merge_methods import merge_tensors

    xs, _ = _random_family(dtype, n=2, seed=2)
    a, b = (x.to(dtype) for x in xs)
    ref = merge_tensors([a, b], "slerp", parameters={"t": t}, base_index=1)
    out = merge("slerp", {"a": a, "b": b}, "b", {}, {"t": t})
    assert out.dtype == ref.dtype and torch.equal(out, ref)


@pytest.mark.mergekit
def test_slerp_matches_mergekit_function_on_chunked_and_colinear_tensors():
    from mergekit.merge_methods.slerp import slerp as mk_slerp

    from evomerge.engine.methods.slerp import slerp

    g = torch.Generator().manual_seed(5)
    a = torch.randn(1200, 1000, generator=g)  # > 2**20 elements: two chunks
    b = 3 * torch.randn(1200, 1000, generator=g) + 0.5 * a
    for x, y in ((a, b), (a, 3 * a), (a, -a), (torch.zeros(10), torch.ones(10)), (torch.zeros(0), torch.zeros(0))):
        ref = mk_slerp(torch.tensor(0.35), x.unsqueeze(0), y.unsqueeze(0))[0]
        assert torch.equal(slerp(0.35, x, y), ref)


@pytest.mark.mergekit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.01, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("rescale", [False, True])
def test_magnitude_trim_matches_mergekit_sparsify(dtype, density, rescale):
    from mergekit.sparsify import RescaleNorm, magnitude

    g = torch.Generator().manual_seed(int(density * 100))
    delta = torch.randn(300, 70, generator=g).to(dtype)  # low precision: many tied magnitudes
    delta[0, :50] = 0.125  # a block of exact ties
    ref = magnitude(delta, density, RescaleNorm.l1 if rescale else None)
    assert torch.equal(magnitude_trim(delta, density, rescale), ref)


@pytest.mark.mergekit
@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_election_matches_mergekit_get_mask(dtype):
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    g = torch.Generator().manual_seed(2)
    deltas = torch.randn(4, 30, 20, generator=g).to(dtype)
    deltas[:, 0, :5] = 0
    for int8 in (False, True):
        ref = get_mask(deltas, "sum", torch.int8 if int8 else dtype)
        assert torch.equal(sign_election_mask(deltas, int8), ref)


@pytest.mark.mergekit
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_bernoulli_drop_matches_mergekit_under_the_same_seed(dtype):
    from mergekit.sparsify import RescaleNorm, bernoulli

    delta = torch.randn(100, 33, generator=torch.Generator().manual_seed(1)).to(dtype)
    for rescale in (False, True):
        torch.manual_seed(123)
        ref = bernoulli(delta, 0.35, RescaleNorm.l1 if rescale else None)
        out = bernoulli_drop(delta, 0.35, rescale, torch.Generator().manual_seed(123))
        assert out.dtype == ref.dtype and torch.equal(out, ref)


@pytest.mark.mergekit
def test_passthrough_matches_mergekit():
    from mergekit.merge_methods import merge_tensors

    x = torch.randn(7, 5).to(torch.bfloat16)
    assert torch.equal(merge("passthrough", {"x": x}), merge_tensors([x], "passthrough"))
    ref = merge_tensors([x], "passthrough", parameters={"scale": [0.3]})
    assert torch.equal(merge("passthrough", {"x": x}, None, {"x": {"scale": 0.3}}), ref)


@pytest.mark.mergekit
def test_declared_defaults_and_required_match_mergekit_specs():
    from mergekit.merge_methods import get as mk_get

    for name in methods.names():
        ours = methods.get(name)
        spec = mk_get(name).spec
        theirs = {p.name: p for p in spec.parameters}
        assert set(theirs) == set(ours.param_names()), name
        for tunable in ours.tunables:
            p = theirs[tunable.name]
            assert tunable.required == p.required, (name, tunable.name)
            if not p.required:
                assert tunable.default == p.default, (name, tunable.name)
            expected_kind = "global" if p.scope.value == "shared" else "model"
            assert tunable.kind == expected_kind, (name, tunable.name)
        contract = spec.contract
        assert ours.requires_base == (contract.base.value == "required"), name
        assert ours.optional_base == (contract.base.value == "optional"), name
        if contract.min_non_base is None and contract.max_non_base is None:
            assert ours.model_count == (contract.min_inputs, contract.max_inputs), name
            assert ours.non_base_count is None, name
        else:  # counted besides the base; the input count follows (with or without the base)
            low, high = contract.min_non_base or 0, contract.max_non_base
            assert ours.non_base_count == (low, high), name
            assert ours.model_count == (max(contract.min_inputs, low), None if high is None else high + 1), name


# ---------------------------------------------------------------- fast top-k selection


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fast_selection_keeps_k_largest_lowest_index_first_on_ties(dtype):
    g = torch.Generator().manual_seed(8)
    delta = (torch.randn(5000, generator=g) * 4).round().to(dtype)  # integers: heavy ties
    mags = delta.abs().float().numpy()
    values = delta.float().numpy()
    for k in (1, 7, 2500, 4999):  # 4999 cuts inside the zeros
        order = np.argsort(-mags, kind="stable")[:k]  # independent: ties -> lowest index first
        expected = np.zeros(mags.size, dtype=np.float32)
        expected[order] = values[order]
        trimmed = magnitude_trim(delta, k / delta.numel() + 1e-9, exact_ties=False)
        assert trimmed.dtype == dtype
        assert np.array_equal(trimmed.float().numpy(), expected), k
        if (mags >= mags[order[-1]]).sum() > k and mags[order[-1]] > 0:  # a non-zero tie at the cut
            mask = magnitude_keep_mask(delta, k, exact_ties=False)
            assert int(mask.sum()) == k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_histogram_cut_equals_kthvalue(dtype):
    from evomerge.engine.methods.arithmetic import _cut

    g = torch.Generator().manual_seed(9)
    delta = torch.randn(3000, generator=g).to(dtype) * 3
    w = delta.abs().float()
    for k in (1, 2, 1500, 2999):
        above, at, n_above, n_at, zero = _cut(delta, k)
        cut = torch.kthvalue(w, w.numel() - k + 1).values
        assert torch.equal(above, w > cut) and torch.equal(at, w == cut) and zero == bool(cut == 0)
        assert n_above == int((w > cut).sum()) and n_at == int((w == cut).sum())
        assert n_above < k <= n_above + n_at
    delta[5] = float("nan")
    assert _cut(delta, 10) is None


def test_zero_cut_is_unambiguous():
    # 6 of 8 entries are zero; keeping k=3 cuts inside the zeros: any zeros kept give equal values
    delta = T([0.0, 5.0, 0.0, 0.0, -2.0, 0.0, 0.0, 0.0])
    assert torch.equal(magnitude_trim(delta, 3 / 8), delta)
    assert torch.equal(magnitude_trim(delta, 3 / 8, exact_ties=False), delta)


def test_ties_fast_mode_equals_exact_mode_without_ties():
    from evomerge.engine.methods.ties import Ties

    xs, _ = _random_family(torch.float64, n=3, seed=4)
    tensors = dict(zip(["b", "m1", "m2"], xs))
    params = {"m1": {"weight": 0.6, "density": 0.3}, "m2": {"weight": 0.4, "density": 0.7}}
    exact = Ties().merge(tensors, "b", params, {})
    fast = Ties(exact_ties=False).merge(tensors, "b", params, {})
    assert torch.equal(exact, fast)


@pytest.mark.mergekit
@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitude_trim_with_nan_or_many_zeros_matches_mergekit(dtype):
    from mergekit.sparsify import magnitude

    g = torch.Generator().manual_seed(12)
    delta = torch.randn(4000, generator=g)
    delta[torch.rand(4000, generator=g) < 0.7] = 0
    delta = delta.to(dtype)
    assert torch.equal(magnitude_trim(delta, 0.5), magnitude(delta, 0.5))
    assert torch.equal(magnitude_trim(delta, 0.5, exact_ties=False), magnitude(delta, 0.5))
    delta[3] = float("nan")
    assert torch.equal(magnitude_trim(delta, 0.2).isnan(), magnitude(delta, 0.2).isnan())
    both = ~magnitude(delta, 0.2).isnan()
    assert torch.equal(magnitude_trim(delta, 0.2)[both], magnitude(delta, 0.2)[both])


# ---------------------------------------------------------------- the methods added to match mergekit's 20


def test_breadcrumbs_drops_outliers_and_the_smallest_by_hand():
    base = torch.zeros(10)
    model = T([3.0, -1.0, 10.0, 5.0, -2.0, 8.0, 4.0, -7.0, 6.0, 9.0])  # |.| ranks: 1<2<3<...<10
    out = merge("breadcrumbs", {"b": base, "m": model}, "b", {"m": {"weight": 1.0, "density": 0.5, "gamma": 0.1}})
    # n=10: keep 5, drop the top 1 (10) and the bottom 4 (1, 2, 3, 4) -> keep |.| in {5, 6, 7, 8, 9}
    assert torch.equal(out, T([0.0, 0.0, 0.0, 5.0, 0.0, 8.0, 0.0, -7.0, 6.0, 9.0]))
    # density + gamma > 1: the bottom cut vanishes and the top cut shrinks so that density is kept:
    # keep 9, the 9 smallest (only the largest, 10, is dropped)
    out = merge("breadcrumbs", {"b": base, "m": model}, "b", {"m": {"weight": 1.0, "density": 0.95, "gamma": 0.5}})
    assert torch.equal(out, torch.where(model.abs() == 10, 0.0, model))


def test_breadcrumbs_ties_elects_signs_after_trimming():
    base = torch.zeros(4)
    a, b = T([1.0, -4.0, 2.0, 3.0]), T([-2.0, 1.0, 1.0, -5.0])
    p = {"a": {"weight": 1.0, "density": 1.0}, "b": {"weight": 1.0, "density": 1.0}}
    out = merge("breadcrumbs_ties", {"z": base, "a": a, "b": b}, "z", p, {"normalize": True})
    # sums [-1, -3, 3, -2] elect [-, -, +, -]: entry 0 keeps b (-2), 1 keeps a (-4), 2 both (mean 1.5), 3 b
    assert torch.equal(out, T([-2.0, -4.0, 1.5, -5.0]))


def test_della_keep_probability_rises_with_magnitude():
    from evomerge.engine.methods.arithmetic import della_magprune

    delta = torch.randn(400, 2000, generator=torch.Generator().manual_seed(0))
    out = della_magprune(delta, 0.5, 0.2, False, torch.Generator().manual_seed(1))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.005  # density is the mean keep rate
    order = delta.abs().argsort(dim=1)
    rows = torch.arange(400).unsqueeze(1)
    smallest, largest = kept[rows, order[:, :200]], kept[rows, order[:, -200:]]
    assert abs(smallest.float().mean().item() - 0.32) < 0.01  # 0.3 + 0.4 * rank: the bottom decile ~0.32
    assert abs(largest.float().mean().item() - 0.68) < 0.01
    rescaled = della_magprune(delta, 0.5, 0.2, True, torch.Generator().manual_seed(1))
    assert torch.allclose(rescaled.abs().sum(), delta.abs().sum(), rtol=1e-4)  # L1 norm restored
    assert torch.equal(rescaled != 0, kept)  # same draw


@pytest.mark.mergekit
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_della_and_breadcrumbs_sparsifiers_match_mergekit(dtype):
    from mergekit.sparsify import RescaleNorm
    from mergekit.sparsify import della_magprune as mk_della
    from mergekit.sparsify import magnitude_outliers as mk_outliers

    from evomerge.engine.methods.arithmetic import della_magprune, magnitude_outliers_trim

    for shape in ((64, 33), (50,)):
        delta = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        for rescale in (False, True):
            norm = RescaleNorm.l1 if rescale else None
            for density, gamma in ((0.5, 0.01), (0.9, 0.2), (0.3, 0.0)):
                assert torch.equal(magnitude_outliers_trim(delta, density, gamma, rescale),
                                   mk_outliers(delta, density, norm, gamma=gamma))
            torch.manual_seed(11)
            ref = mk_della(delta, 0.6, 0.2, norm)
            out = della_magprune(delta, 0.6, 0.2, rescale, torch.Generator().manual_seed(11))
            assert out.dtype == ref.dtype and torch.equal(out, ref)  # the same draw, to the bit


def test_della_epsilon_out_of_range_is_a_config_error():
    base, m = torch.zeros(6, 5), torch.randn(6, 5)
    with pytest.raises(ConfigError, match="outside \\(0, 1\\)"):
        merge("della", {"b": base, "m": m}, "b", {"m": {"weight": 1.0, "density": 0.9, "epsilon": 0.15}},
              generator=torch.Generator().manual_seed(0))
    d = methods.get("della")
    with pytest.raises(ConfigError) as err:
        d.check_tensor(["b", "m"], "b", {"m": {"weight": 1.0, "density": 0.1, "epsilon": 0.15}}, {}, "x.weight")
    assert "x.weight" in err.value.where and "epsilon below" in err.value.fix


def test_model_stock_by_hand():
    base = torch.zeros(2, 2)
    same = torch.ones(2, 2)
    # identical offsets: cos 1, t = 2 * 1 / (1 + 1) = 1 -> the models' average
    assert torch.equal(merge("model_stock", {"b": base, "x": same, "y": same.clone()}, "b"), same)
    # orthogonal offsets: cos 0, t = 0 -> the base
    x, y = T([[1.0, 0.0], [0.0, 0.0]]), T([[0.0, 1.0], [0.0, 0.0]])
    assert torch.equal(merge("model_stock", {"b": base, "x": x, "y": y}, "b"), base)
    # cos 0.5 (60 degrees): t = 2 * 0.5 / 1.5 = 2/3, average (0.5, sqrt(3)/4) flattened
    x, y = T([1.0, 0.0]), T([0.5, math.sqrt(3) / 2])
    out = merge("model_stock", {"b": torch.zeros(2), "x": x, "y": y}, "b")
    assert torch.allclose(out, (2 / 3) * (x + y) / 2, atol=1e-6)
    # filter_wise: one t per row (row 0 identical offsets -> average, row 1 orthogonal -> base)
    x, y = T([[2.0, 2.0], [1.0, 0.0]]), T([[2.0, 2.0], [0.0, 1.0]])
    out = merge("model_stock", {"b": torch.zeros(2, 2), "x": x, "y": y}, "b", None, {"filter_wise": True})
    assert torch.allclose(out, T([[2.0, 2.0], [0.0, 0.0]]), atol=1e-6)


def test_nearswap_by_hand():
    base, other = T([0.0, 0.0, 0.0]), T([0.001, 0.004, 0.1])
    out = merge("nearswap", {"b": base, "o": other}, "b", None, {"t": 0.002})
    # w = clamp(0.002 / |diff|, 0, 1): 1 (swapped in), 0.5, 0.02
    assert torch.allclose(out, T([0.001, 0.002, 0.002]), atol=1e-7)


def test_nuslerp_and_multislerp_and_karcher_meet_at_the_spherical_midpoint():
    x, y = T([1.0, 0.0]), T([0.0, 1.0])
    half = T([math.sqrt(0.5), math.sqrt(0.5)])
    w = {"x": {"weight": 1.0}, "y": {"weight": 1.0}}
    assert torch.allclose(merge("nuslerp", {"x": x, "y": y}, None, w), half, atol=1e-6)
    assert torch.allclose(merge("multislerp", {"x": x, "y": y}, None, w), half, atol=1e-6)
    assert torch.allclose(merge("karcher", {"x": x, "y": y}), half, atol=1e-5)
    # nuslerp t = w_y / (w_x + w_y): 1/3 of the way from x to y, on the arc
    out = merge("nuslerp", {"x": x, "y": y}, None, {"x": {"weight": 2.0}, "y": {"weight": 1.0}})
    assert torch.allclose(out, T([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)
    # with a base, the task vectors are interpolated: base + midpoint
    base = T([5.0, -1.0])
    out = merge("nuslerp", {"b": base, "x": base + x, "y": base + y}, "b", w)
    assert torch.allclose(out, base + half, atol=1e-6)


def test_sce_by_hand():
    base = torch.zeros(3)
    a, b = T([1.0, 2.0, -1.0]), T([3.0, -2.0, -1.0])
    out = merge("sce", {"z": base, "a": a, "b": b}, "z")
    # energies mean(tv^2): a 2, b 14/3 -> weights 3/10, 7/10; signs of the sums [+, 0 -> +, -]
    # entry 0: both agree -> 0.3*1 + 0.7*3 = 2.4; entry 1: only a (+) -> 2; entry 2: both -> -1
    assert torch.allclose(out, T([2.4, 2.0, -1.0]), atol=1e-6)
    # variances across the models [1, 4, 0]: 2 non-zero; select_topk 0.5 keeps int(2 * 0.5) = 1, entry 1;
    # there a (+2) and b (-2) sum to 0, which elects +, so a's 2 remains
    out = merge("sce", {"z": base, "a": a, "b": b}, "z", None, {"select_topk": 0.5})
    assert torch.allclose(out, T([0.0, 2.0, 0.0]), atol=1e-6)
    # 0.34 keeps int(0.68) = 0 entries: nothing is merged
    assert torch.equal(merge("sce", {"z": base, "a": a, "b": b}, "z", None, {"select_topk": 0.34}), base)


def test_ram_and_ramplus_by_hand():
    base = torch.zeros(3)
    a, b = T([1.0, 0.0, 2.0]), T([0.0, 0.0, 4.0])
    # entry 0 changed by a alone (taken whole), entry 2 by both (averaged)
    assert torch.equal(merge("ram", {"z": base, "a": a, "b": b}, "z"), T([1.0, 0.0, 3.0]))
    out = merge("ramplus_tl", {"z": base, "a": a, "b": b}, "z", None, {"r": 0.1, "alpha": 0.2})
    # a: 1 shared, 1 unique -> rho 1, capped at alpha 0.2 -> its unique entry x 1.02
    assert torch.allclose(out, T([1.02, 0.0, 3.0]), atol=1e-6)


def test_arcee_fusion_against_an_independent_numpy_reference():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(16, 12, generator=g)
    other = base + 0.01 * torch.randn(16, 12, generator=g)
    other[3] += torch.randn(12, generator=g)  # one row changed a lot
    out = merge("arcee_fusion", {"b": base, "o": other}, "b")
    b, o = base.double().numpy(), other.double().numpy()

    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True) + 1e-8

    kl = (softmax(o) * np.log(softmax(o) / softmax(b))).sum(axis=-1, keepdims=True)
    importance = np.abs(o - b) * kl
    flat = np.sort(importance.reshape(-1))
    q1, med, q3 = (flat[int(q * (flat.size - 1))] for q in (0.25, 0.5, 0.75))
    keep = importance >= med + 1.5 * (q3 - q1)
    assert keep[3].all() and keep.sum() < keep.size / 4  # the changed row whole, and few others
    assert np.array_equal(out.numpy() != base.numpy(), keep)  # untouched exactly where not taken
    assert np.allclose(out.numpy(), np.where(keep, o, b))


@pytest.mark.parametrize("case, message", [
    (("nearswap", 3), "takes exactly 2 input models"),
    (("model_stock", 2), "takes at least 3 input models"),
    (("arcee_fusion", 3), "takes exactly 2 input models"),
    (("nuslerp", 4), "takes between 2 and 3 input models"),
    (("nuslerp", 2), "merges exactly 2 models besides the base"),
])
def test_model_count_mistakes(case, message):
    name, n = case
    names = [f"m{i}" for i in range(n)]
    with pytest.raises(ConfigError, match=message):
        methods.get(name).check_models(names[1:], names[0])


def test_karcher_with_an_unlisted_base_is_refused():
    with pytest.raises(ConfigError, match="karcher treats every model alike") as err:
        methods.get("karcher").check_models(["a", "b"], "base")
    assert err.value.where == "base_model"
    assert methods.get("karcher").check_models(["base", "a", "b"], "base") == ["base", "a", "b"]
