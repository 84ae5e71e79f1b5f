"""Exact streaming per-neuron mean and variance (pass 1 of network discovery).

X (tokens x neurons) never exists in memory, so the statistics are accumulated batch by batch
as (count, mean, centred sum of squares M2) and combined with Chan et al.'s pairwise update,
which is exact up to float64 rounding and associative enough that ranks can be merged in any
fixed order:

    n = na + nb,   d = mu_b - mu_a,   mu = mu_a + d nb / n,   M2 = M2a + M2b + d^2 na nb / n

A batch's own (mean, M2) is computed two-pass (centre, then square) on the batch's device, so a
torch batch on a GPU only ships two D-vectors to the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from fnscale.errors import UsageError

# A neuron whose std is below this fraction of |mean| (or exactly 0) is treated as constant:
# float64 rounding of a constant column leaves a std around 1e-16 |mean|, never 1e-9 |mean|.
_CONSTANT_RTOL = 1e-9
_BLOCK_ELEMENTS = 1 << 24


def as_2d(batch, name: str = "batch"):
    """Return `batch` (numpy array or torch tensor) checked to be 2-D (tokens x neurons)."""
    ndim = getattr(batch, "ndim", None)
    if ndim is None:
        batch = np.asarray(batch)
        ndim = batch.ndim
    if ndim != 2:
        raise UsageError(
            f"{name} must be 2-D (tokens x neurons), got shape {tuple(batch.shape)}; "
            "flatten batch and sequence dimensions and drop padding first"
        )
    return batch


def batch_moments(batch) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, centred sum of squares) of one batch, as float64 numpy D-vectors."""
    batch = as_2d(batch)
    n = int(batch.shape[0])
    if _is_torch(batch):
        import torch

        x = batch.detach().to(torch.float64)
        mean = x.mean(dim=0)
        m2 = ((x - mean) ** 2).sum(dim=0)
        mean, m2 = mean.cpu().numpy(), m2.cpu().numpy()
    else:
        x = np.asarray(batch, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite input is refused below
            mean = x.mean(axis=0)
            m2 = ((x - mean) ** 2).sum(axis=0)
    if not (np.isfinite(mean).all() and np.isfinite(m2).all()):
        raise UsageError(
            "activations contain NaN or inf; run the model in a dtype that does not overflow "
            "(e.g. --dtype bfloat16 or float32) or drop the offending samples"
        )
    return n, mean, m2


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


@dataclass
class RunningStats:
    """Per-neuron count, mean and centred sum of squares (float64), mergeable exactly.

    `count_` is the number of tokens, `mean_` and `m2_` are D-vectors. An empty state
    (count 0, no width yet) merges as the identity, so ranks with no data take part too.
    """

    count_: int = 0
    mean_: np.ndarray | None = None
    m2_: np.ndarray | None = None

    @property
    def n_features(self) -> int | None:
        return None if self.mean_ is None else int(self.mean_.shape[0])

    def update(self, batch) -> RunningStats:
        """Fold one batch (tokens x neurons) into the state in place; empty batches are skipped."""
        batch = as_2d(batch)
        # float64 copies are made per block of rows (~128 MiB), never for the whole batch
        rows = max(1, _BLOCK_ELEMENTS // max(int(batch.shape[1]), 1))
        state = RunningStats(self.count_, self.mean_, self.m2_)
        for start in range(0, batch.shape[0], rows):
            state = merge(state, RunningStats(*batch_moments(batch[start : start + rows])))
        self.count_, self.mean_, self.m2_ = state.count_, state.mean_, state.m2_
        return self

    def var(self, ddof: int = 1) -> np.ndarray:
        """Per-neuron variance; ddof=1 (sample variance) matches the PCA's n-1 convention."""
        self._check_fitted()
        if self.count_ - ddof <= 0:
            raise UsageError(f"need more than {ddof} token(s) for a variance, got {self.count_}")
        return self.m2_ / (self.count_ - ddof)

    def std(self, ddof: int = 1) -> np.ndarray:
        return np.sqrt(self.var(ddof))

    def constant_mask(self) -> np.ndarray:
        """True for neurons that never vary (dead or constant): they are left out of the PCA."""
        self._check_fitted()
        sd = np.sqrt(self.m2_ / max(self.count_, 1))
        return sd <= _CONSTANT_RTOL * np.abs(self.mean_)

    def inverse_std(self, ddof: int = 1) -> np.ndarray:
        """1/std per neuron, 0 for constant neurons so their standardised value is exactly 0."""
        sd = self.std(ddof)
        const = self.constant_mask() | (sd == 0)
        with np.errstate(divide="ignore"):
            return np.where(const, 0.0, 1.0 / np.where(const, 1.0, sd))

    def _check_fitted(self) -> None:
        if self.mean_ is None or self.count_ == 0:
            raise UsageError("no activations were seen (0 tokens); check the data and the padding mask")

    @staticmethod
    def merge(a: RunningStats, b: RunningStats) -> RunningStats:
        return merge(a, b)


def merge(a: RunningStats, b: RunningStats) -> RunningStats:
    """Exact combination of two states (Chan et al.); returns a new state."""
    if a.count_ == 0 or a.mean_ is None:
        return RunningStats(b.count_, _copy(b.mean_), _copy(b.m2_))
    if b.count_ == 0 or b.mean_ is None:
        return RunningStats(a.count_, _copy(a.mean_), _copy(a.m2_))
    if a.mean_.shape != b.mean_.shape:
        raise UsageError(
            f"cannot merge statistics over {a.mean_.shape[0]} and {b.mean_.shape[0]} neurons; "
            "every batch and rank must capture the same layers"
        )
    n = a.count_ + b.count_
    delta = b.mean_ - a.mean_
    mean = a.mean_ + delta * (b.count_ / n)
    m2 = a.m2_ + b.m2_ + delta**2 * (a.count_ * b.count_ / n)
    return RunningStats(n, mean, m2)


def _copy(x):
    return None if x is None else np.array(x, dtype=np.float64, copy=True)


# ----------------------------------------------------------------------------- distributed

S = TypeVar("S")


def torch_all_gather(obj) -> list:
    """Gather a picklable object from every rank (rank order) with torch.distributed.

    Falls back to `[obj]` when no process group is initialised, so single-process code needs
    no special case.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def merge_across_ranks(state: S, gather_fn: Callable[[S], Sequence[S]] | None = None) -> S:
    """Merge one mergeable state per rank into the global state, identical on every rank.

    `gather_fn(state)` must return all ranks' states in rank order (default: `torch_all_gather`,
    i.e. `torch.distributed.all_gather_object`). Every rank then folds them left to right with
    `type(state).merge` on CPU float64, so the same inputs in the same order give bit-identical
    results everywhere without a broadcast. Works for `RunningStats` and `pca.PCAState`.
    """
    states = list((gather_fn or torch_all_gather)(state))
    if not states:
        raise RuntimeError("gather_fn returned no states")
    out = states[0]
    for other in states[1:]:
        out = type(out).merge(out, other)
    return out
