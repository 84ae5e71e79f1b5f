"""Functional networks from streamed activations: stats -> incremental PCA -> FastICA -> masks.

Temporal ICA (default, the paper's): sources are independent over tokens and each column of
the mixing matrix A (neurons x k) is the spatial map of one network.

    pass 1  per-neuron mean/std                       (stats.RunningStats, mergeable)
    pass 2  incremental PCA of standardised rows      (pca.IncrementalPCA, mergeable)
    pass 3  z_raw = (x_std - mu) V_k^T  (tokens x k)  -> FastICA -> A = V_k^T mixing
            (= V_k^T diag(S_k / sqrt(n-1)) W^-1 when the PCA is exact; we re-whiten z_raw
             exactly, which absorbs the streaming PCA's small error in S_k)

Spatial ICA: FastICA on V_k^T (neurons as samples); the maps are the sources; passes 1-2 only.
Each map is thresholded at its |.| percentile p (98 keeps ~2% of neurons). Memory is
O(neurons x k') plus Z (tokens x k); the activations themselves are never held.

Single process: `decompose(batches, k)`. Distributed (every rank runs the same calls):

    dec = StreamingDecomposer(k, ...)
    for b in my_batches(): dec.update_stats(b)
    dec.merge_stats()                 # all_gather_object + fixed-order merge, identical on all ranks
    for b in my_batches(): dec.update_pca(b)
    dec.merge_pca()
    z = [dec.project(b) for b in my_batches()]        # temporal only; [] on a rank with no data
    result = dec.finish(torch_all_gather(z))           # per-rank lists in rank order -> FastICA

Every rank then holds the same result (same Z, same seed, same CPU code). To run FastICA once,
gather Z to rank 0 instead (`dist.gather_object`), call `finish` there and broadcast the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fnscale.errors import UsageError
from fnscale.networks.ica import fast_ica
from fnscale.networks.pca import IncrementalPCA, PCAState
from fnscale.networks.stats import RunningStats, as_2d, merge_across_ranks

KINDS = ("temporal", "spatial")


@dataclass
class Decomposition:
    """The k networks found in one decomposition; arrays index the flat neuron axis."""

    mixing: np.ndarray  # neurons x k: spatial map of each network (temporal: A; spatial: the ICA sources)
    masks: list[np.ndarray]  # k boolean arrays over neurons: |map| >= its percentile
    thresholds: np.ndarray  # (k,) the |map| value each mask is cut at
    explained_variance: np.ndarray  # (k,) variance of the standardised activations carried by each network
    explained_variance_ratio: np.ndarray  # (k,) the same over the total variance
    pca_explained_variance_ratio: np.ndarray  # (k,) of the top-k principal directions
    n_tokens: int
    mean: np.ndarray  # (neurons,) activation mean
    std: np.ndarray | None  # (neurons,) activation std (ddof=1); None when standardize=False
    kind: str = "temporal"
    percentile: float = 98.0
    converged: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def n_components(self) -> int:
        return self.mixing.shape[1]

    @property
    def n_neurons(self) -> int:
        return self.mixing.shape[0]


def _check_args(n_components, percentile, kind) -> None:
    if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or n_components < 1:
        raise UsageError(f"n_components must be a whole number >= 1, got {n_components!r}")
    try:
        p = float(percentile)
    except (TypeError, ValueError):
        p = float("nan")
    if not 0.0 < p < 100.0:
        raise UsageError(
            f"percentile must be between 0 and 100 (exclusive), got {percentile!r}; 98 keeps ~2% of neurons"
        )
    if kind not in KINDS:
        raise UsageError(f"unknown ICA kind {kind!r}; use 'temporal' or 'spatial'")


class StreamingDecomposer:
    """The three passes as separate steps, so ranks can fit shares and merge in between."""

    def __init__(
        self,
        n_components: int,
        *,
        percentile: float = 98.0,
        kind: str = "temporal",
        standardize: bool = True,
        backend: str = "auto",
        seed: int = 0,
        oversample: int = 10,
        device=None,
        chunk_size: int | None = None,
        max_iter: int = 1000,
        tol: float = 1e-5,
        fold_stats: bool = False,
    ):
        _check_args(n_components, percentile, kind)
        self.n_components = int(n_components)
        self.percentile = float(percentile)
        self.kind = kind
        self.standardize = bool(standardize)
        self.seed = int(seed)
        self.max_iter, self.tol = int(max_iter), float(tol)
        self._pca_kwargs = dict(oversample=oversample, backend=backend, device=device, chunk_size=chunk_size)
        IncrementalPCA(1, **self._pca_kwargs)  # refuse an unknown/unavailable backend before any pass
        self.fold_stats = bool(fold_stats)
        self.stats_ = RunningStats()
        self.pca_: IncrementalPCA | None = None
        self._projector = None

    @property
    def n_passes(self) -> int:
        """Passes over the data this configuration needs (1 to 3)."""
        return int(self.standardize and not self.fold_stats) + 1 + int(self.kind == "temporal")

    # -- fold_stats=True: statistics and PCA in one pass (replaces passes 1 and 2)

    def update(self, batch) -> None:
        """Fold a batch into the exact statistics and into a PCA of the running-standardised rows.

        Before each batch the PCA state is rescaled to the standardisation known so far
        (`IncrementalPCA.rescale`), and `merge` rescales it to the exact final one, so the result
        differs from the 3-pass path only through where the k' truncation happened.
        """
        if not self.standardize:
            return self.update_pca(batch)
        batch = as_2d(batch)
        if not batch.shape[0]:
            return None
        self._projector = None
        self.stats_.update(batch)
        scale = self._running_scale()
        if self.pca_ is None:
            self.pca_ = IncrementalPCA(self.n_components, scale=scale, **self._pca_kwargs)
        else:
            self.pca_.rescale(scale)
        self.pca_.partial_fit(batch)
        return None

    def _running_scale(self) -> np.ndarray:
        """1/std so far; a neuron constant so far gets the median std, so its later variation is not lost."""
        st = self.stats_
        sd = np.sqrt(st.m2_ / max(st.count_ - 1, 1))
        live = ~st.constant_mask() & (sd > 0)
        return 1.0 / np.where(live, sd, float(np.median(sd[live])) if live.any() else 1.0)

    def merge(self, gather_fn: Callable | None = None) -> None:
        """After the folded pass (every rank): merge the statistics, rescale every PCA state to the
        exact standardisation, merge them, and set the exact total variance."""
        if not self.standardize:
            return self.merge_pca(gather_fn)
        self.merge_stats(gather_fn)
        inv = self.stats_.inverse_std()
        if self.pca_ is None:  # a rank with no batches still takes part in the collective
            self.pca_ = IncrementalPCA(self.n_components, scale=inv, **self._pca_kwargs)
        self.pca_.rescale(inv)
        self.merge_pca(gather_fn)
        exact = float((self.stats_.m2_ * inv * inv).sum())
        self.pca_.set_state(replace(self.pca_.get_state(), total_m2_=exact))
        return None

    # -- pass 1

    def update_stats(self, batch) -> None:
        if self.pca_ is not None:
            raise RuntimeError("update_stats after the PCA pass started; run pass 1 to the end first")
        self.stats_.update(batch)

    def merge_stats(self, gather_fn: Callable | None = None) -> None:
        """Replace this rank's statistics with all ranks' (call on every rank, after pass 1)."""
        self.stats_ = merge_across_ranks(self.stats_, gather_fn)

    # -- pass 2

    def _start_pca(self, n_features: int) -> IncrementalPCA:
        shift = scale = None
        if self.standardize:
            st = self.stats_
            if st.count_ == 0:
                raise UsageError("no tokens were seen in the statistics pass; check the data and the padding mask")
            self._check_sizes(st.count_, st.n_features)
            if n_features != st.n_features:
                raise UsageError(f"batch has {n_features} neurons but the statistics pass saw {st.n_features}")
            shift, scale = st.mean_, st.inverse_std()
        return IncrementalPCA(self.n_components, shift=shift, scale=scale, **self._pca_kwargs)

    def update_pca(self, batch) -> None:
        batch = as_2d(batch)
        self._projector = None
        if self.pca_ is None:
            self.pca_ = self._start_pca(int(batch.shape[1]))
        if batch.shape[0]:
            self.pca_.partial_fit(batch)

    def merge_pca(self, gather_fn: Callable | None = None) -> None:
        """Replace this rank's PCA state with all ranks' (call on every rank, after pass 2)."""
        if self.pca_ is None:  # a rank with no batches still takes part in the collective
            self.pca_ = self._start_pca(self.stats_.n_features or 0)
        self.pca_.set_state(merge_across_ranks(self.pca_.get_state(), gather_fn))
        self._projector = None

    def pca_state(self) -> PCAState:
        if self.pca_ is None:
            raise RuntimeError("no PCA pass yet; call update_pca on the batches first")
        return self.pca_.get_state()

    # -- pass 3 and ICA

    def _check_sizes(self, n_tokens: int, n_neurons: int) -> None:
        k = self.n_components
        if n_tokens <= k:
            raise UsageError(
                f"n_components={k} needs more tokens than components, got {n_tokens} tokens; "
                "use more samples or fewer components"
            )
        if n_neurons < k:
            raise UsageError(f"n_components={k} is more than the {n_neurons} neurons captured; use fewer components")

    def _final_state(self) -> PCAState:
        st = self.pca_state()
        if st.n_samples_seen_ == 0:
            raise UsageError("no tokens were seen; check the data and the padding mask")
        self._check_sizes(st.n_samples_seen_, st.n_features)
        if self.standardize and st.n_samples_seen_ != self.stats_.count_:
            raise UsageError(
                f"the statistics pass saw {self.stats_.count_} tokens but the PCA pass {st.n_samples_seen_}; "
                "the batches must be the same on every pass (no shuffling, same padding)"
            )
        if st.components_.shape[0] < self.n_components:
            raise UsageError(
                f"the standardised activations have only {st.components_.shape[0]} independent directions, "
                f"fewer than n_components={self.n_components}; use fewer components or more varied data"
            )
        return st

    def project(self, batch) -> np.ndarray:
        """Pass 3: this batch's coordinates in the top-k principal directions (tokens x k)."""
        if self._projector is None:
            self._final_state()
            self._projector = self.pca_.projector(self.n_components)
        return self._projector(batch)

    def finish(self, Z: np.ndarray | Sequence[np.ndarray] | None = None) -> Decomposition:
        """Run FastICA and threshold the maps. Temporal: Z holds every token's `project` rows
        (one array, or nested lists of arrays in rank/batch order). Spatial: Z is not used."""
        st = self._final_state()
        k, n = self.n_components, st.n_samples_seen_
        V = st.components_[:k]  # k x D
        lam = st.singular_values_[:k] ** 2 / (n - 1)
        if self.kind == "temporal":
            if Z is None:
                raise UsageError("temporal ICA needs the projected tokens: pass Z from project() (pass 3)")
            parts = [np.asarray(z, dtype=np.float64).reshape(-1, k) for z in _flatten(Z)]
            Z = np.concatenate(parts or [np.zeros((0, k))])
            if Z.shape != (n, k):
                raise UsageError(
                    f"Z must be {n} tokens x {k} components (all ranks), got {Z.shape}; "
                    "the batches changed between passes"
                )
            ica = fast_ica(Z, seed=self.seed, max_iter=self.max_iter, tol=self.tol)
            maps = V.T @ ica.mixing_  # D x k; columns of A
            variance = (maps**2).sum(axis=0)
        else:
            ica = fast_ica(V.T, seed=self.seed, max_iter=self.max_iter, tol=self.tol)
            maps = ica.sources_  # D x k, unit variance over neurons
            # token-variance carried by map c: X ~ Z_raw M maps^T, Z_raw has covariance diag(lam)
            M = ica.mixing_  # k x k
            variance = np.einsum("ic,i,ic->c", M, lam, M) * (maps**2).sum(axis=0)
        skew = np.sign((maps**3).sum(axis=0))
        maps = maps * np.where(skew == 0, 1.0, skew)  # a network's neurons are its heavy positive tail
        order = np.argsort(-variance, kind="stable")
        maps, variance = maps[:, order], variance[order]
        absmaps = np.abs(maps)
        thresholds = np.percentile(absmaps, self.percentile, axis=0)
        masks = [(absmaps[:, c] >= thresholds[c]) & (absmaps[:, c] > 0) for c in range(k)]
        total = st.total_m2_ / (n - 1)
        return Decomposition(
            mixing=maps,
            masks=masks,
            thresholds=thresholds,
            explained_variance=variance,
            explained_variance_ratio=variance / total if total > 0 else np.zeros_like(variance),
            pca_explained_variance_ratio=st.explained_variance_ratio_[:k],
            n_tokens=int(n),
            mean=self.stats_.mean_ if self.standardize else st.mean_,
            std=self.stats_.std() if self.standardize else None,
            kind=self.kind,
            percentile=self.percentile,
            converged=ica.converged_,
            extra={
                "ica_n_iter": ica.n_iter_,
                "pca_singular_values": st.singular_values_[:k],
                "backend": self.pca_.backend_,
            },
        )


def _flatten(parts):
    if isinstance(parts, (list, tuple)):
        for p in parts:
            yield from _flatten(p)
    else:
        yield parts


def _passes(batches, n_passes: int) -> Callable[[], Iterable]:
    """A zero-arg function giving a fresh iterable per pass; refuse a one-shot iterator we'd need twice."""
    if callable(batches):
        return batches
    if iter(batches) is batches and n_passes > 1:
        raise UsageError(
            f"decompose streams over the data {n_passes} times but got a one-shot iterator; pass a list "
            "or a zero-arg function that returns a fresh iterator (e.g. lambda: iter(loader))"
        )
    return lambda: batches


def decompose(batches, n_components: int, percentile: float = 98.0, kind: str = "temporal", **options) -> Decomposition:
    """Find `n_components` functional networks in activations streamed as 2-D batches.

    `batches`: a list/re-iterable of (tokens x neurons) numpy arrays or torch tensors, or a
    zero-arg function returning a fresh iterable (needed for generators: up to 3 passes).
    `options` are `StreamingDecomposer`'s (standardize, backend, seed, oversample, device, chunk_size,
    max_iter, tol, fold_stats); `fold_stats=True` runs 2 passes instead of 3 (statistics folded into the PCA pass).
    """
    dec = StreamingDecomposer(n_components, percentile=percentile, kind=kind, **options)
    standardize = dec.standardize
    fresh = _passes(batches, dec.n_passes)
    empty = UsageError("no tokens to decompose (every batch was empty); check the data and the padding mask")
    if dec.fold_stats:
        for b in fresh():
            dec.update(b)
    else:
        if standardize:
            for b in fresh():
                dec.update_stats(b)
            if dec.stats_.count_ == 0:
                raise empty
        for b in fresh():
            dec.update_pca(b)
    if dec.pca_ is None or dec.pca_.get_state().n_samples_seen_ == 0:
        raise empty
    if dec.fold_stats:
        dec.merge(lambda state: [state])
    Z = [dec.project(b) for b in fresh()] if kind == "temporal" else None
    return dec.finish(Z)
