"""Conformance suite: every registered merge method must pass these, whatever its formula.

Like optuna's sampler test suite: a new method is added to the registry and inherits these checks
(declared tunables are coherent, output shape/dtype equal the inputs', results deterministic given
the generator, inputs untouched, bad values and model counts rejected before merging).
"""

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from evomerge.engine import methods
from evomerge.errors import ConfigError
from evomerge.engine.methods.base import MergeMethod, Tunable

ALL = methods.names()


def valid_value(tunable: Tunable):
    """A valid, non-default value (so every parameter path is exercised)."""
    if tunable.type == "bool":
        return not tunable.default if tunable.default is not None else True
    if tunable.type == "int":
        return int(tunable.low or 0) + 2
    low, high = tunable.search_range or (tunable.low or 0.0, tunable.high or 1.0)
    value = low + 0.37 * (high - low)
    tunable.check(value, "probe")
    return value


def setup(method: MergeMethod, dtype=torch.float32, shape=(6, 5), seed=0):
    low, high = method.model_count
    count = max(low, 3) if high is None else min(max(low, 3), high)
    if method.non_base_count is not None:  # a base (where it may have one) plus the others it counts
        nlow, nhigh = method.non_base_count
        count = int(method.takes_base) + (max(nlow, 2) if nhigh is None else min(max(nlow, 2), nhigh))
    names = [f"m{i}" for i in range(count)]
    base = names[0] if method.takes_base else None
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(shape, generator=g)
    tensors = {n: (first + 0.5 * torch.randn(shape, generator=g)).to(dtype) for n in names}
    model_params = {
        n: {t.name: valid_value(t) for t in method.params_for(n, base)} for n in names
    }
    global_params = {t.name: valid_value(t) for t in method.global_params}
    return tensors, base, model_params, global_params


@pytest.fixture(params=ALL)
def method(request):
    return methods.get(request.param)


def test_registry_import_does_not_import_torch():
    code = "import sys, evomerge.engine.methods as m; m.get('ties').tunables; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_declares_tunables_once_and_coherently(method):
    assert method.name in ALL and isinstance(method.requires_base, bool)
    low, high = method.model_count
    assert low >= 1 and (high is None or high >= low)
    names = [t.name for t in method.tunables]
    assert len(names) == len(set(names)), "a tunable is declared twice"
    assert all(t.kind == "model" for t in method.tensor_params)
    assert all(t.kind == "global" for t in method.global_params)
    for t in method.tunables:
        assert t.type in ("float", "int", "bool")
        assert not (t.required and t.default is not None), t.name
        if t.default is not None:
            assert t.check(t.default, "default") == t.default, t.name
        if t.search_range is not None:
            lo, hi = t.search_range
            assert lo < hi
            t.check(lo, "search low")
            t.check(hi, "search high")
        assert method.tunable(t.name) is t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(6, 5), (17,), (2, 3, 4), (1,), ()])
def test_output_shape_and_dtype_equal_input(method, dtype, shape):
    tensors, base, model_params, global_params = setup(method, dtype, shape)
    out = method.merge(
        tensors, base, model_params, global_params, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == torch.Size(shape) and out.dtype == dtype
    assert torch.isfinite(out).all()


def test_deterministic_given_generator_and_inputs_untouched(method):
    tensors, base, model_params, global_params = setup(method, shape=(40, 30))
    before = {n: t.clone() for n, t in tensors.items()}
    one = method.merge(tensors, base, model_params, global_params, generator=torch.Generator().manual_seed(7))
    two = method.merge(tensors, base, model_params, global_params, generator=torch.Generator().manual_seed(7))
    assert torch.equal(one, two)
    for n in tensors:
        assert torch.equal(tensors[n], before[n]), f"{method.name} modified input {n}"
    for n in tensors:
        assert one.data_ptr() != tensors[n].data_ptr(), "result must not alias an input"
    other = method.merge(tensors, base, model_params, global_params, generator=torch.Generator().manual_seed(8))
    assert torch.equal(one, other) != method.uses_generator


def test_result_does_not_depend_on_global_rng_when_given_a_generator(method):
    tensors, base, model_params, global_params = setup(method)
    torch.manual_seed(1)
    one = method.merge(tensors, base, model_params, global_params, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(99)
    two = method.merge(tensors, base, model_params, global_params, generator=torch.Generator().manual_seed(2))
    assert torch.equal(one, two)


def _bad_values(t: Tunable):
    if t.type == "bool":  # mergekit reads 1, 0.0 and "yes" as bools (YAML truthy numbers); these it refuses
        return ["maybe", 2, 0.5]
    bad = [float("nan"), float("inf"), "0.5", True]
    if t.low is not None:
        bad.append(t.low if t.low_open else t.low - 1e-6)
    if t.high is not None:
        bad.append(t.high if t.high_open else t.high + 1e-6)
    return bad


def test_rejects_out_of_range_values_before_merging(method):
    tensors, base, model_params, global_params = setup(method)
    model = next((n for n in tensors if method.params_for(n, base)), None)
    for t in method.tensor_params if model is not None else ():
        for bad in _bad_values(t):
            params = {n: dict(p) for n, p in model_params.items()}
            params[model][t.name] = bad
            with pytest.raises(ConfigError) as info:
                method.merge(tensors, base, params, global_params)
            assert t.name in info.value.where and model in info.value.where
    for t in method.global_params:
        for bad in _bad_values(t):
            with pytest.raises(ConfigError) as info:
                method.merge(tensors, base, model_params, {**global_params, t.name: bad})
            assert info.value.where == f"parameters.{t.name}"


def test_missing_required_parameters_are_config_errors(method):
    tensors, base, model_params, global_params = setup(method)
    for t in method.global_params:
        if t.required:
            with pytest.raises(ConfigError, match=repr(t.name)):
                method.merge(tensors, base, model_params, {k: v for k, v in global_params.items() if k != t.name})
    for t in method.tensor_params:
        if t.required:
            params = {n: {k: v for k, v in p.items() if k != t.name} for n, p in model_params.items()}
            with pytest.raises(ConfigError, match=repr(t.name)):
                method.merge(tensors, base, params, global_params)


def test_defaults_fill_missing_optional_parameters(method):
    tensors, base, model_params, global_params = setup(method)
    explicit = {t.name: t.default for t in method.global_params if not t.required}
    required_globals = {k: v for k, v in global_params.items() if method.tunable(k).required}
    models_required = {
        n: {k: v for k, v in p.items() if method.tunable(k).required} for n, p in model_params.items()
    }
    models_explicit = {
        n: {**p, **{t.name: t.default for t in method.params_for(n, base) if not t.required}}
        for n, p in models_required.items()
    }
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    implicit = method.merge(tensors, base, models_required, required_globals, generator=g())
    spelled = method.merge(tensors, base, models_explicit, {**required_globals, **explicit}, generator=g())
    assert torch.equal(implicit, spelled)


def test_rejects_wrong_model_counts(method):
    low, high = method.model_count
    tensors, base, model_params, global_params = setup(method)
    template = next(iter(tensors.values()))
    if high is not None:
        many = {f"x{i}": template.clone() for i in range(high + 1)}
        if base is not None:
            many = {base: template.clone(), **{f"x{i}": template.clone() for i in range(high)}}
        params = {n: {t.name: valid_value(t) for t in method.params_for(n, base)} for n in many}
        with pytest.raises(ConfigError):
            method.merge(many, base, params, global_params)
        with pytest.raises(ConfigError):
            method.check_models(list(many), base)
    if low > 1:
        few = dict(list(tensors.items())[: low - 1])
        with pytest.raises(ConfigError):
            method.merge(few, base, model_params, global_params)


def test_base_rules(method):
    tensors, base, model_params, global_params = setup(method)
    if method.requires_base:
        with pytest.raises(ConfigError) as info:
            method.merge(tensors, None, model_params, global_params)
        assert info.value.where == "base_model"
        with pytest.raises(ConfigError):
            method.merge(tensors, "not-an-input", model_params, global_params)
    elif method.optional_base:
        # with a base: task vectors against it; without (the base dropped): the models themselves
        others = {n: t for n, t in tensors.items() if n != base}
        params = {n: p for n, p in model_params.items() if n != base}
        with_base = method.merge(tensors, base, model_params, global_params)
        without = method.merge(others, None, params, global_params)
        assert with_base.shape == without.shape and not torch.equal(with_base, without)
    else:
        # a base name is irrelevant to base-less methods: same result either way
        first = next(iter(tensors))
        g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        assert torch.equal(
            method.merge(tensors, first, model_params, global_params, generator=g()),
            method.merge(tensors, None, model_params, global_params, generator=g()),
        )


def test_unknown_parameter_names_are_rejected_with_suggestion(method):
    with pytest.raises(ConfigError) as info:
        method.check_params({"wieght": 1.0}, "models[0].parameters")
    assert info.value.where == "models[0].parameters.wieght"
    if method.tunable("weight") is not None:
        assert "did you mean 'weight'" in info.value.fix


def test_merge_rejects_undeclared_parameter_names(method):
    tensors, base, model_params, global_params = setup(method)
    with pytest.raises(ConfigError) as info:
        method.merge(tensors, base, model_params, {**global_params, "lamda": 1.0})
    assert info.value.where == "parameters.lamda"
    first = next(iter(tensors))
    params = {**model_params, first: {**model_params[first], "densty": 0.5}}
    with pytest.raises(ConfigError, match="densty"):
        method.merge(tensors, base, params, global_params)
