"""Streaming incremental PCA with oversampling and an exact, order-fixed merge (pass 2).

The state after any number of rows is (n, mean, V [r x D], S [r], total centred sum of squares),
r <= k' = k + oversample. Two states a, b combine by the stacked-SVD update that scikit-learn's
`IncrementalPCA.partial_fit` performs:

    M = [ S_a V_a ; S_b V_b ; sqrt(na nb / n) (mu_a - mu_b) ]      ((ra + rb + 1) x D)

whose top-k' right singular vectors and values are the new V, S. A batch of rows is a state with
S V = its centred rows, so `partial_fit` and `merge` are one function. M is wide (a few hundred
rows, D up to 1e5+), so its SVD comes from the eigendecomposition of the tiny Gram matrix M M^T.
Truncating to k' after each step is what makes this approximate; the oversampled k' - k
directions soak up the truncation error so the top k stay accurate (tests: principal-angle
cosines >= 0.99 against an exact SVD).

Backends run the same update: `numpy` (float64, CPU; `sklearn` is accepted as an alias, the
name it had because it is scikit-learn's algorithm), `torch` (CUDA when present, also CPU), `cuml` (RAPIDS
`IncrementalPCA` on the GPU, imported lazily). With cuML, a fresh cuML estimator fits each batch and fnscale
merges the batch's state into the running one (on the torch device), so rescaling between batches (the folded
statistics pass) and merging across ranks work the same for every backend. Exported states are always numpy
float64, and merging them (`merge`, `stats.merge_across_ranks`) always runs on the CPU, so every rank gets
bit-identical results.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import numpy as np

from fnscale.config import PCA_BACKEND_ALIASES, PCA_BACKENDS
from fnscale.errors import UsageError
from fnscale.networks.stats import as_2d, merge_across_ranks, torch_all_gather  # noqa: F401 (re-export)

BACKENDS = PCA_BACKENDS
# Fewest rows per update: on the CPU the per-row cost ~ (k' + chunk)^2 / chunk x D is smallest near chunk = k';
# on a GPU each update is a handful of kernels and a host sync (the rank of the update), so larger chunks keep it busy.
MIN_CHUNK_CPU, MIN_CHUNK_GPU = 64, 1024


# ----------------------------------------------------------------------------- array ops


class _NumpyOps:
    """numpy float64 on the CPU."""

    name = "numpy"

    def asarray(self, x):
        if type(x).__module__.startswith("torch"):
            import torch

            return x.detach().to("cpu", torch.float64).numpy()
        return np.asarray(x, dtype=np.float64)

    def to_numpy(self, x):
        return np.asarray(x, dtype=np.float64)

    def cat(self, xs):
        return np.concatenate(xs, axis=0)

    def eigh_desc(self, g, k):
        lam, u = np.linalg.eigh(g)
        return lam[::-1][:k].copy(), u[:, ::-1][:, :k].copy()

    def eps(self):
        return float(np.finfo(np.float64).eps)

    sqrt = staticmethod(np.sqrt)

    def clamp0(self, x):
        return np.maximum(x, 0.0)

    def abs_argmax_rows(self, v):
        return np.argmax(np.abs(v), axis=1)

    def sign(self, x):
        s = np.sign(x)
        return np.where(s == 0, 1.0, s)

    def arange(self, n):
        return np.arange(n)


class _TorchOps:
    """torch on `device` in `dtype` (float64 by default: the Gram trick squares the condition
    number, so float32 would blur all but the leading components)."""

    name = "torch"

    def __init__(self, device=None, dtype=None):
        import torch

        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or torch.float64

    def asarray(self, x):
        t = self.torch
        if not isinstance(x, t.Tensor):  # a GPU array (cuML's results) is wrapped without a copy
            x = t.as_tensor(x) if hasattr(x, "__cuda_array_interface__") else t.as_tensor(np.asarray(x))
        return x.detach().to(self.device, self.dtype)

    def to_numpy(self, x):
        return x.detach().to("cpu", self.torch.float64).numpy()

    def cat(self, xs):
        return self.torch.cat(xs, dim=0)

    def eigh_desc(self, g, k):
        lam, u = self.torch.linalg.eigh(g)
        return self.torch.flip(lam, (0,))[:k], self.torch.flip(u, (1,))[:, :k]

    def eps(self):
        return float(self.torch.finfo(self.dtype).eps)

    def sqrt(self, x):
        return self.torch.sqrt(x)

    def clamp0(self, x):
        return self.torch.clamp(x, min=0.0)

    def abs_argmax_rows(self, v):
        return self.torch.argmax(v.abs(), dim=1)

    def sign(self, x):
        s = self.torch.sign(x)
        return self.torch.where(s == 0, self.torch.ones_like(s), s)

    def arange(self, n):
        return self.torch.arange(n, device=self.device)


def _top_svd(ops, m, k):
    """Top-k singular values and right singular vectors of m (r x D) via a Gram matrix.

    Directions whose singular value is below sqrt(eps) * S_max carry no accurate information
    through a Gram matrix and are dropped, so the result may have fewer than k rows.
    Signs are fixed (largest |entry| of each vector positive), as sklearn's `svd_flip` does.
    """
    r, d = m.shape
    if r <= d:
        lam, u = ops.eigh_desc(m @ m.T, k)
        s = ops.sqrt(ops.clamp0(lam))
        keep = _rank(ops, s)
        s, u = s[:keep], u[:, :keep]
        v = (u.T @ m) / s[:, None]
    else:
        lam, e = ops.eigh_desc(m.T @ m, k)
        s = ops.sqrt(ops.clamp0(lam))
        keep = _rank(ops, s)
        s, v = s[:keep], e[:, :keep].T
    if keep:
        idx = ops.abs_argmax_rows(v)
        v = v * ops.sign(v[ops.arange(keep), idx])[:, None]
    return s, v


def _rank(ops, s) -> int:
    if s.shape[0] == 0:
        return 0
    smax = float(s[0])
    if smax <= 0.0:
        return 0
    return int((s > smax * 10.0 * math.sqrt(ops.eps())).sum())


def _combine(ops, a, b, keep):
    """Stacked-SVD merge of two native states a, b = (n, mean, SV rows, m2); returns (n, mean, S, V, m2)."""
    na, mean_a, sv_a, m2a = a
    nb, mean_b, sv_b, m2b = b
    n = na + nb
    delta = mean_b - mean_a
    mean = mean_a + delta * (nb / n)
    m2 = m2a + m2b + float((delta * delta).sum()) * (na * nb / n)
    rows = [sv_a, sv_b, (delta * math.sqrt(na * nb / n))[None, :]]
    s, v = _top_svd(ops, ops.cat([r for r in rows if r.shape[0]]), keep)
    return n, mean, s, v, m2


# ----------------------------------------------------------------------------- state


@dataclass
class PCAState:
    """A picklable PCA state (numpy float64), the unit that is merged across ranks.

    `components_` has r <= `n_components` rows (k' = k + oversample), sorted by singular value.
    `total_m2_` is the total centred sum of squares of everything seen, for variance ratios.
    """

    n_components: int
    n_samples_seen_: int = 0
    mean_: np.ndarray | None = None
    components_: np.ndarray | None = None
    singular_values_: np.ndarray | None = None
    total_m2_: float = 0.0

    @property
    def n_features(self) -> int | None:
        return None if self.mean_ is None else int(self.mean_.shape[0])

    @property
    def explained_variance_(self) -> np.ndarray:
        return self.singular_values_**2 / max(self.n_samples_seen_ - 1, 1)

    @property
    def explained_variance_ratio_(self) -> np.ndarray:
        return self.singular_values_**2 / self.total_m2_ if self.total_m2_ > 0 else np.zeros_like(self.singular_values_)

    @staticmethod
    def merge(a: PCAState, b: PCAState) -> PCAState:
        return merge(a, b)


def merge(a: PCAState, b: PCAState) -> PCAState:
    """Combine two states exactly as if one had seen both halves (up to the k' truncation).

    Runs in numpy float64 on the CPU so that merging the same states in the same order gives
    bit-identical results on every rank. An empty state is the identity.
    """
    keep = max(a.n_components, b.n_components)
    if a.n_samples_seen_ == 0:
        return replace(b, n_components=keep)
    if b.n_samples_seen_ == 0:
        return replace(a, n_components=keep)
    if a.n_features != b.n_features:
        raise UsageError(
            f"cannot merge PCA states over {a.n_features} and {b.n_features} neurons; "
            "every rank must capture the same layers"
        )
    ops = _NumpyOps()
    n, mean, s, v, m2 = _combine(
        ops,
        (a.n_samples_seen_, a.mean_, a.singular_values_[:, None] * a.components_, a.total_m2_),
        (b.n_samples_seen_, b.mean_, b.singular_values_[:, None] * b.components_, b.total_m2_),
        keep,
    )
    return PCAState(keep, n, mean, v, s, m2)


# ----------------------------------------------------------------------------- backends


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuml_available() -> bool:
    try:
        import cuml  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken RAPIDS install counts as absent
        return False
    return _cuda_available()


def resolve_backend(backend: str) -> str:
    """Map `auto|cuml|torch|numpy` (or the alias `sklearn`) to the backend that will run; refuse what cannot."""
    name = str(backend).lower()
    name = PCA_BACKEND_ALIASES.get(name, name)
    if name not in BACKENDS:
        raise UsageError(f"unknown PCA backend {backend!r}; use one of: {', '.join(BACKENDS)}")
    if name == "auto":
        if _cuml_available():
            return "cuml"
        return "torch" if _cuda_available() else "numpy"
    if name == "cuml" and not _cuml_available():
        raise UsageError(
            "--pca-backend cuml needs RAPIDS cuML and a CUDA GPU, and they were not found; "
            "install cuml (https://docs.rapids.ai/install) or use --pca-backend auto"
        )
    return name


def _top_of_state(name: str) -> property:
    """A fitted attribute: the first n_components rows of the state's `name` (the state keeps the oversampled extra)."""
    return property(lambda self: getattr(self._fitted(), name)[: self.n_components])


class IncrementalPCA:
    """Streaming PCA keeping k' = n_components + oversample directions.

    `shift`/`scale` (D-vectors) are applied to every input row first, `(x - shift) * scale`,
    so standardisation happens per chunk on the backend's device and X never needs a
    standardised copy. Rows are consumed in chunks of `chunk_size` (default 2 k', at least
    `MIN_CHUNK_CPU` rows on the CPU and `MIN_CHUNK_GPU` on a GPU). Torch tensors on the backend's
    device are used where they are: activations on a GPU stay there.

    Distributed use: each rank calls `partial_fit` on its share, then
    `ipca.set_state(merge_across_ranks(ipca.get_state(), gather_fn))`.
    """

    def __init__(
        self,
        n_components: int,
        *,
        oversample: int = 10,
        backend: str = "auto",
        device=None,
        dtype=None,
        chunk_size: int | None = None,
        shift=None,
        scale=None,
    ):
        if int(n_components) < 1:
            raise UsageError(f"n_components must be >= 1, got {n_components}")
        if int(oversample) < 0:
            raise UsageError(f"oversample must be >= 0, got {oversample}")
        self.n_components = int(n_components)
        self.oversample = int(oversample)
        self.keep = self.n_components + self.oversample
        self.backend_ = resolve_backend(backend)
        # numpy: the CPU; torch and cuML: torch ops on `device` (CUDA when present) hold the state and project.
        self._ops = _NumpyOps() if self.backend_ == "numpy" else _TorchOps(device, dtype)
        on_gpu = self.backend_ != "numpy" and self._ops.device.type != "cpu"
        self.chunk_size = int(chunk_size or max(2 * self.keep, MIN_CHUNK_GPU if on_gpu else MIN_CHUNK_CPU))
        self._shift = None if shift is None else self._ops.asarray(shift)
        self._scale = None if scale is None else self._ops.asarray(scale)
        self._native = None  # (n, mean, S, V, m2) in the ops' arrays
        self._width = None  # neurons per row, fixed by the first batch

    # -- fitting

    def _prep(self, x):
        x = self._ops.asarray(x)
        if self._shift is not None:
            x = x - self._shift
        if self._scale is not None:
            x = x * self._scale
        return x

    def partial_fit(self, X) -> IncrementalPCA:
        """Fold rows of X (tokens x neurons; numpy or torch, any float dtype) into the state."""
        X = as_2d(X)
        if not X.shape[0]:
            return self
        width = int(X.shape[1])
        if self._width is not None and width != self._width:
            raise UsageError(
                f"batch has {width} neurons but earlier batches had {self._width}; "
                "capture the same layers for every batch"
            )
        self._width = width
        if self.backend_ == "cuml":  # near-equal chunks: cuML keeps as many directions as the smallest has rows
            n = int(X.shape[0])
            parts = math.ceil(n / self.chunk_size)
            cuts = [n * i // parts for i in range(parts + 1)]
            chunks = (self._prep(X[a:b]) for a, b in zip(cuts, cuts[1:]))
            self._absorb(_cuml_fit(chunks, min(cuts[1], width), self._ops))
            return self
        for start in range(0, X.shape[0], self.chunk_size):
            self._fold(self._prep(X[start : start + self.chunk_size]))
        return self

    def _fold(self, x):
        """Fold one chunk of prepared rows into the state (the stacked update)."""
        mu = x.mean(0)
        xc = x - mu
        self._absorb((x.shape[0], mu, xc, float((xc * xc).sum())))

    def _absorb(self, b):
        """Merge b = (n, mean, rows whose Gram is b's centred scatter, m2) into the state."""
        if self._native is None:
            n, mean, rows, m2 = b
            s, v = _top_svd(self._ops, rows, self.keep)
            self._native = (n, mean, s, v, m2)
            return
        n, mean, s, v, m2 = self._native
        self._native = _combine(self._ops, (n, mean, s[:, None] * v, m2), b, self.keep)

    def rescale(self, scale) -> IncrementalPCA:
        """Switch to a new per-neuron `scale` (no `shift`), converting the state to it.

        Rows seen so far were fitted as x * old; multiplying the state's mean and its S V rows by
        r = scale / old column-wise gives the state of x * scale, exactly when nothing was truncated.
        With truncation the error is bounded by max(r)^2 times the discarded energy: the running
        standardisation of `StreamingDecomposer(fold_stats=True)` relies on this. `total_m2_` becomes
        an estimate (the caller that knows the exact value sets it).
        """
        if self._shift is not None:
            raise RuntimeError("rescale needs a state fitted without a shift")
        new = self._ops.asarray(scale)
        if self._native is not None:
            n, mean, s, v, m2 = self._native
            old = self._scale if self._scale is not None else new * 0 + 1
            r = new / (old + (old == 0)) * (old != 0)  # a neuron zeroed before stays zero
            sv = (s[:, None] * v) * r
            kept = float((sv * sv).sum())
            s2, v2 = _top_svd(self._ops, sv, self.keep)
            resid = max(m2 - float((s * s).sum()), 0.0) * float((r * r).mean())
            self._native = (n, mean * r, s2, v2, kept + resid)
        self._scale = new
        return self

    # -- state

    def get_state(self) -> PCAState:
        """The current state as numpy float64 (picklable, mergeable)."""
        if self._native is None:
            return PCAState(self.keep)
        n, mean, s, v, m2 = self._native
        to = self._ops.to_numpy
        return PCAState(self.keep, int(n), to(mean), to(v), to(s), float(m2))

    def set_state(self, state: PCAState) -> IncrementalPCA:
        """Replace the state (e.g. with the all-rank merge); fitting may continue afterwards."""
        if state.n_samples_seen_ == 0:
            self._native = None
            return self
        a = self._ops.asarray
        self._native = (
            state.n_samples_seen_,
            a(state.mean_),
            a(state.singular_values_),
            a(state.components_),
            state.total_m2_,
        )
        self._width = state.n_features
        return self

    # -- fitted attributes (top n_components of the state)

    def _fitted(self) -> PCAState:
        st = self.get_state()
        if st.n_samples_seen_ == 0:
            raise UsageError("the PCA has seen no data; call partial_fit with at least one non-empty batch")
        return st

    @property
    def n_samples_seen_(self) -> int:
        return self.get_state().n_samples_seen_

    @property
    def mean_(self) -> np.ndarray:
        return self._fitted().mean_

    components_ = _top_of_state("components_")
    singular_values_ = _top_of_state("singular_values_")
    explained_variance_ = _top_of_state("explained_variance_")
    explained_variance_ratio_ = _top_of_state("explained_variance_ratio_")

    # -- projection (pass 3)

    def projector(self, n_components: int | None = None):
        """A function x -> (prep(x) - mean) V_k^T as numpy float64 (tokens x k), computed on the backend's device."""
        st = self._fitted()
        k = n_components or self.n_components
        ops = self._ops
        mean, vt = ops.asarray(st.mean_), ops.asarray(st.components_[:k]).T

        def project(x):
            x = as_2d(x)
            if not x.shape[0]:
                return np.zeros((0, vt.shape[1]))
            step = self.chunk_size
            z = [(self._prep(x[i : i + step]) - mean) @ vt for i in range(0, x.shape[0], step)]
            return ops.to_numpy(ops.cat(z))

        return project

    def transform(self, X) -> np.ndarray:
        return self.projector()(X)


def _to_cuml(x):
    """A torch tensor as cuML input without a copy: cupy (DLPack) on a GPU, numpy on the CPU."""
    if x.is_cuda:
        import cupy

        return cupy.from_dlpack(x)
    return x.numpy()


def _cuml_fit(chunks, n_components: int, ops):
    """(n, mean, S V rows, m2) of one batch, fitted chunk by chunk by a fresh cuML IncrementalPCA, as `ops` arrays.

    cuML updates with an exact SVD of the stacked [S V; chunk; mean correction] (scikit-learn's update, no Gram
    matrix). It needs at least `n_components` rows per call, so the batch comes in near-equal chunks and it keeps
    as many directions as the smallest chunk has rows (>= k', or all of a short batch): merging its state into
    the running one (`IncrementalPCA._absorb`) truncates no more than the numpy path does.
    """
    from cuml.decomposition import IncrementalPCA as CumlIPCA

    on = contextlib.nullcontext()
    if ops.device.type == "cuda":  # cuML computes on cupy's current device: make it the tensors' device
        import cupy

        on = cupy.cuda.Device(ops.device.index if ops.device.index is not None else ops.torch.cuda.current_device())
    with on:
        est = CumlIPCA(n_components=n_components, output_type="input")
        for x in chunks:
            est.partial_fit(_to_cuml(x))
    n = int(est.n_samples_seen_)
    mean, s, v, var = (ops.asarray(a) for a in (est.mean_, est.singular_values_, est.components_, est.var_))
    return n, mean, s[:, None] * v, float(var.sum()) * n  # var_: the ddof=0 variance of the batch
