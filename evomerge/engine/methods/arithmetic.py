"""The tensor arithmetic several merge methods share, exactly as mergekit 0.1.5 computes it.

Why it exists: TIES, DARE, breadcrumbs, DELLA and SCE differ in how they sparsify task vectors and
elect signs, not in the skeleton around it (`task_arithmetic.TaskArithmetic`). Each of these steps is
written once here: magnitude trimming (with a linear-time top-k that matches mergekit's argsort bit
for bit), DARE's Bernoulli drop, Model Breadcrumbs' outlier trim, DELLA's MagPrune, L1 rescaling and
TIES sign election. torch is imported inside functions only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from evomerge.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch


L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor tolerance


def masked_l1_rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """`tensor * mask`, and with `rescale` scaled so its L1 norm equals the unmasked one.

    This is mergekit's `rescale` (RescaleNorm.l1), not a plain 1/density factor. When either norm
    is below 1e-7 the masked tensor is returned unscaled.
    """
    masked = tensor * mask
    if not rescale:
        return masked
    before = tensor.abs().sum()
    after = masked.abs().sum()
    if before < L1_EPS or after < L1_EPS:
        return masked
    return masked * (before / after)


def _argsort_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    """mergekit's own selection: the first k of a descending argsort of the magnitudes."""
    import torch

    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    mask[torch.argsort(w, descending=True)[:k]] = True
    return mask


_HALF_NAN_BITS = {"bfloat16": 0x7F80, "float16": 0x7C00}  # |x| bit patterns above these are NaN


def _cut(tensor: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, int, int, bool] | None:
    """Split |tensor| (flat) at its k-th largest value.

    Returns (above the cut, at the cut, how many above, how many at, whether the cut is 0), or None
    when a NaN is present (the caller then defers to argsort, as mergekit sorts NaNs).
    16-bit floats use a 2**15-bin histogram of their magnitude bit patterns (order-preserving for
    non-negative floats); other dtypes use kthvalue on float32 (as mergekit compares on CPU).
    Either way the split is exact.
    """
    import torch

    name = str(tensor.dtype).removeprefix("torch.")
    if name in _HALF_NAN_BITS and tensor.device.type == "cpu":
        bits = tensor.abs().reshape(-1).view(torch.int16)
        counts = torch.bincount(bits, minlength=1 << 15)
        if int(counts[_HALF_NAN_BITS[name] + 1 :].sum()):
            return None
        from_top = counts.flip(0).cumsum(0)
        cut = (1 << 15) - 1 - int(torch.searchsorted(from_top, k))
        n_at = int(counts[cut])
        n_above = int(from_top[(1 << 15) - 1 - cut]) - n_at
        return bits > cut, bits == cut, n_above, n_at, cut == 0
    w = tensor.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    if bool(torch.isnan(w).any()):
        return None
    cut = torch.kthvalue(w, w.numel() - k + 1).values
    above, at = w > cut, w == cut
    return above, at, int(torch.count_nonzero(above)), int(torch.count_nonzero(at)), bool(cut == 0)


def magnitude_keep_mask(tensor: torch.Tensor, k: int, *, exact_ties: bool = True) -> torch.Tensor:
    """Boolean mask (flat) of the `k` entries of largest magnitude.

    Selection compares magnitudes in float32 (as mergekit does on CPU). The k-th largest magnitude
    is found in linear time; when the cut is unambiguous (no tie straddles it, or the tied
    entries are zeros, which are the same value kept or dropped) the result is exactly mergekit's.
    When several non-zero entries share the cut magnitude, mergekit keeps the ones its unstable
    argsort happens to put first: with `exact_ties` (default) we run that same argsort and match
    it bit for bit (slow: bfloat16 task vectors almost always tie); without, the lowest flat
    indices win (deterministic, about 3x faster for a bfloat16 TIES merge, differs from mergekit
    only in which of equal-magnitude entries survive).
    """
    import torch

    n = tensor.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=tensor.device)
    split = _cut(tensor, k)
    if split is None:
        w = tensor.abs().reshape(-1)
        return _argsort_mask(w.float() if w.device.type == "cpu" else w, k)
    above, at, n_above, n_at, zero_cut = split
    if zero_cut or n_above + n_at == k:
        return above.logical_or_(at)
    if exact_ties:
        w = tensor.abs().reshape(-1)
        return _argsort_mask(w.float() if w.device.type == "cpu" else w, k)
    first_tied = torch.nonzero(at).reshape(-1)[: k - n_above]
    above[first_tied] = True
    return above


def magnitude_trim(
    delta: torch.Tensor, density: float, rescale: bool = False, *, exact_ties: bool = True
) -> torch.Tensor:
    """TIES trimming: keep the top `density` fraction of `delta` by magnitude, zero the rest.

    mergekit 0.1.5 `sparsify.magnitude`: density >= 1 returns `delta` itself; density <= 0 or an
    empty tensor gives zeros; otherwise k = max(1, int(density * numel)) entries are kept, in
    `delta`'s dtype, then optionally L1-rescaled.
    """
    import torch

    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    keep = magnitude_keep_mask(delta, k, exact_ties=exact_ties)
    mask = keep.to(delta.dtype).reshape(delta.shape)
    return masked_l1_rescaled(delta, mask, rescale)


def bernoulli_drop(
    delta: torch.Tensor,
    density: float,
    rescale: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """DARE: keep each entry of `delta` with probability `density`, optionally L1-rescale.

    mergekit 0.1.5 `sparsify.bernoulli`: density >= 1 returns `delta` unchanged and draws NO random
    numbers. Otherwise ONE `torch.bernoulli` call draws the whole mask from a tensor of `delta`'s
    shape filled with `density`, in the work dtype (bfloat16 stays bfloat16 on CPU; float16,
    float32 and float64 work in float32), using `generator` (None: torch's global RNG, which is
    what mergekit uses after `--random-seed`). The result is cast back to `delta`'s dtype.
    """
    import torch

    if density >= 1:
        return delta
    if delta.device.type != "cpu" or delta.dtype == torch.bfloat16:
        work = delta.dtype
    else:
        work = torch.float32
    probs = torch.full_like(delta, density, dtype=work)
    mask = torch.bernoulli(probs, generator=generator)
    return masked_l1_rescaled(delta.to(work), mask, rescale).to(delta.dtype)


def magnitude_outliers_trim(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Model Breadcrumbs: drop the `gamma` fraction of largest entries (outliers) AND the smallest ones,
    keeping `density` of the task vector.

    mergekit 0.1.5 `sparsify.magnitude_outliers`: density >= 1 returns `delta` itself. Otherwise, with
    n entries, keep = int(density * n), top = int(gamma * n), bottom = max(0, n - keep - top); the
    entries are ranked by an ascending sort of |delta| (float32 on CPU) and ranks
    [bottom, bottom + keep) are kept (so the outlier cut shrinks when density + gamma > 1), in
    `delta`'s dtype, then optionally L1-rescaled."""
    import torch

    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    bottom = max(0, n - keep - int(gamma * n))
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    order = torch.sort(w, descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[bottom : bottom + keep]] = 1
    return masked_l1_rescaled(delta, mask.reshape(delta.shape), rescale)


def della_magprune(
    delta: torch.Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """DELLA's MagPrune: drop entries at random, the smaller ones more often.

    mergekit 0.1.5 `sparsify.della_magprune`: density >= 1 returns `delta` (no draw); density <= 0
    gives zeros. Per row (a 1-d tensor is one row), entries are ranked by magnitude (an ascending
    argsort of |delta| in its own dtype; rank 1 = smallest); the keep probability rises linearly with
    the normalised rank from density - epsilon to density + epsilon (both must lie in (0, 1): see
    `check_della`). ONE `torch.bernoulli` call draws the mask with `generator`, in the work dtype
    (bfloat16 stays bfloat16 on CPU; float16/32/64 work in float32); the kept entries are optionally
    L1-rescaled (per tensor) and the result is cast back. A row of one entry, where the rank cannot be
    normalised (0/0 in mergekit), gets probability `density`."""
    import torch

    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    shape = delta.shape
    work = delta.dtype if delta.device.type != "cpu" or delta.dtype == torch.bfloat16 else torch.float32
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta  # 1-d (and 0-d): one row
    ranks = rows.abs().argsort(dim=1, descending=False).argsort(dim=1).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    span = high - low
    scaled = torch.where(span > 0, (ranks - low) / torch.where(span > 0, span, 1), 0.5).clamp(0, 1)
    probs = (density - epsilon) + scaled * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator).to(work)
    return masked_l1_rescaled(rows.to(work), mask, rescale).to(delta.dtype).reshape(shape)


def check_della(density: float, epsilon: float, where: str) -> None:
    """DELLA keeps entries with probabilities density -/+ epsilon: both must be in (0, 1)."""
    if density < 1 and density > 0 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ConfigError(
            f"density {density:g} with epsilon {epsilon:g} gives keep probabilities "
            f"{density - epsilon:g} to {density + epsilon:g}, outside (0, 1)",
            where=where,
            fix="choose epsilon below min(density, 1 - density), e.g. density 0.5 with epsilon 0.15",
        )


def sign_election_mask(deltas: torch.Tensor, int8_mask: bool = False) -> torch.Tensor:
    """TIES sign election over stacked weighted task vectors `deltas` [models, *shape].

    mergekit 0.1.5 `get_mask(method="sum")`: the elected sign of each entry is the sign of the SUM
    of the weighted deltas (a zero sum elects +); an entry of a model counts when its own sign
    equals the elected one (so trimmed zeros never count). `int8_mask` only changes the dtype the
    signs are compared in, not the result. Returns a bool tensor shaped like `deltas`.
    """
    import torch

    mask_dtype = torch.int8 if int8_mask else deltas.dtype
    sign = deltas.sign().to(mask_dtype)
    elected = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return sign == elected
