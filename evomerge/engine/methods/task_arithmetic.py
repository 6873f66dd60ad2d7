"""Task arithmetic, and the shared skeleton of TIES and DARE: base + lambda * combined task vectors.

mergekit 0.1.5 implements `task_arithmetic`, `ties`, `dare_ties` and `dare_linear` as one
"generalized task arithmetic" with two switches: how each task vector is sparsified (none,
magnitude, Bernoulli) and whether a sign consensus is taken. `TaskArithmetic` is that skeleton;
ties.py and dare.py only override `sparsify` and the switches. The arithmetic, per output tensor:

    delta_i = model_i - base                      (in the common input dtype, e.g. bfloat16)
    delta_i = sparsify(delta_i, density_i)        (ties: top-k magnitude; dare: Bernoulli drop)
    delta_i *= weight_i                           (weight cast to that dtype)
    with consensus (ties, dare_ties):
        mask_i  = sign(delta_i) == sign(sum_j delta_j)   (zero sum elects +)
        mixed   = sum_i delta_i * mask_i ;  divisor = sum_i weight_i * mask_i  (0 -> 1)
    without (task_arithmetic, dare_linear):
        mixed   = sum_i delta_i           ;  divisor = sum_i weight_i  (|.| < 1e-8 -> 1)
    if normalize: mixed /= divisor
    if lambda != 1: mixed *= lambda
    result = base + mixed                          (in the input dtype)

The base's own per-model parameters are ignored; `weight` is required for every other model.
`density`, `rescale` and `int8_mask` are accepted by every method of the family (mergekit accepts
them) but have no effect where the method does not sparsify / take a consensus.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from evomerge.engine.methods.arithmetic import sign_election_mask
from evomerge.engine.methods.base import MergeMethod, Tunable

if TYPE_CHECKING:  # pragma: no cover
    import torch


def weight_tunable() -> Tunable:
    return Tunable(
        "weight",
        default=None,
        required=True,
        kind="model",
        search_low=0.0,
        search_high=1.0,
        doc="scale of this model's task vector; any finite number",
    )


def density_tunable(effective: bool) -> Tunable:
    return Tunable(
        "density",
        default=1.0,
        low=0.0,
        high=1.0,
        low_open=True,
        kind="model",
        searchable=effective,
        search_low=0.1,
        search_high=1.0,
        doc="fraction of the task vector kept" if effective else "accepted; no effect here",
    )


def lambda_tunable() -> Tunable:
    return Tunable(
        "lambda",
        default=1.0,
        kind="global",
        search_low=0.5,
        search_high=1.5,
        doc="scale of the combined task vector",
    )


def normalize_tunable(default: bool) -> Tunable:
    return Tunable(
        "normalize",
        default=default,
        kind="global",
        type="bool",
        doc="divide the combined task vector by the sum of the (agreeing) weights",
    )


def rescale_tunable(default: bool, effective: bool) -> Tunable:
    return Tunable(
        "rescale",
        default=default,
        kind="global",
        type="bool",
        searchable=effective,
        doc="scale each sparsified task vector back to its original L1 norm"
        if effective
        else "accepted; no effect without sparsification",
    )


def int8_mask_tunable() -> Tunable:
    return Tunable(
        "int8_mask",
        default=False,
        kind="global",
        type="bool",
        searchable=False,
        doc="compare signs in int8 (memory only; never changes the result)",
    )


def family_globals(*, normalize: bool, rescale: bool, sparsifies: bool = True) -> tuple[Tunable, ...]:
    """The shared options of every task-vector method, with that method's defaults (mergekit's)."""
    return (
        int8_mask_tunable(),
        normalize_tunable(normalize),
        rescale_tunable(rescale, effective=sparsifies),
        lambda_tunable(),
    )


class TaskArithmetic(MergeMethod):
    """base + lambda * sum_i weight_i * (model_i - base); no sparsification, no consensus."""

    name = "task_arithmetic"
    requires_base = True
    model_count = (1, None)
    base_takes_model_params = False
    reference_url = "https://arxiv.org/abs/2212.04089"
    consensus: ClassVar[bool] = False
    tensor_params = (weight_tunable(), density_tunable(effective=False))
    global_params = family_globals(normalize=False, rescale=False, sparsifies=False)

    def sparsify(
        self,
        delta: torch.Tensor,
        params: dict,
        global_params: dict,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Sparsify one task vector; identity for plain task arithmetic."""
        return delta

    def _merge(self, tensors, base_index, model_params, global_params, generator):
        import torch

        base = tensors[base_index]
        others = [i for i in range(len(tensors)) if i != base_index]
        if not others:
            return base.clone()
        deltas = base.new_empty((len(others), *base.shape))
        for row, index in enumerate(others):
            delta = tensors[index] - base
            deltas[row] = self.sparsify(delta, model_params[index], global_params, generator)
            del delta
        weights = torch.tensor(
            [model_params[i]["weight"] for i in others], dtype=deltas.dtype, device=deltas.device
        ).reshape((len(others),) + (1,) * base.dim())
        deltas.mul_(weights)
        if self.consensus:
            # the bool mask is cast once and reused (mergekit casts it twice; same values)
            mask = sign_election_mask(deltas, bool(global_params["int8_mask"])).to(deltas.dtype)
            divisor = (weights * mask).sum(dim=0)
            mixed = deltas.mul_(mask).sum(dim=0)
            del mask
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        del deltas
        if global_params["normalize"]:
            mixed /= divisor
        if global_params["lambda"] != 1:
            mixed *= global_params["lambda"]
        return (base + mixed).to(base.dtype)
