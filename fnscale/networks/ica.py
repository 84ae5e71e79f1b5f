"""FastICA (logcosh, parallel/symmetric decorrelation) on a small matrix.

Only small matrices reach ICA: Z (tokens x k) for temporal ICA or V_k^T (neurons x k) for
spatial ICA. We whiten exactly here (eigendecomposition of the k x k covariance, ddof=1) and
run the parallel FastICA iteration on the white data, so the unmixing is orthogonal and the
mixing matrix has a closed form:

    X - mean = sources @ mixing_.T,     sources = (X - mean) @ unmixing_.T  (unit variance)

Re-whitening Z exactly also absorbs the small error of the streaming PCA's singular values.
The iteration is scikit-learn's `FastICA(whiten=False, fun="logcosh", algorithm="parallel")`
step for step, including its seeded start (`RandomState(seed).normal`), and the tests check
that the two agree; it lives here in numpy so that capture ranks need not import scikit-learn.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from fnscale.errors import UsageError


@dataclass
class ICAResult:
    sources_: np.ndarray  # (samples x k), unit variance (ddof=1)
    mixing_: np.ndarray  # (features x k)
    unmixing_: np.ndarray  # (k x features)
    mean_: np.ndarray  # (features,)
    n_iter_: int
    converged_: bool


def fast_ica(
    X: np.ndarray,
    *,
    n_components: int | None = None,
    seed: int = 0,
    max_iter: int = 1000,
    tol: float = 1e-5,
) -> ICAResult:
    """Deterministic FastICA of X (samples x features) for a given `seed`.

    `n_components` < features keeps the leading principal directions of X before the rotation.
    Warns (does not fail) when FastICA stops at `max_iter` before reaching `tol`.
    """
    X = np.asarray(X, dtype=np.float64)
    n, f = X.shape
    k = f if n_components is None else int(n_components)
    if not 1 <= k <= f:
        raise UsageError(f"ICA needs 1 <= n_components <= {f} features, got {k}")
    if n <= k:
        raise UsageError(f"ICA of {k} components needs more than {k} samples, got {n}; use more data or fewer components")
    mean = X.mean(axis=0)
    Xc = X - mean
    lam, E = np.linalg.eigh(Xc.T @ Xc / (n - 1))
    lam, E = lam[::-1][:k], E[:, ::-1][:, :k]
    if lam[-1] <= lam[0] * 1e-12:
        raise UsageError(
            f"the data have fewer than {k} independent directions; lower n_components "
            "or capture more varied text"
        )
    K = E / np.sqrt(lam)  # features x k whitening
    Xw = Xc @ K
    W, n_iter, converged = _parallel_logcosh(Xw, np.random.RandomState(seed).normal(size=(k, k)), max_iter, tol)
    if not converged:
        warnings.warn(
            f"FastICA did not converge in {max_iter} iterations (tol {tol}); the networks may be "
            "unstable: use more tokens, fewer components, or a larger max_iter",
            RuntimeWarning,
            stacklevel=2,
        )
    unmixing = W @ K.T  # W is orthogonal because Xw is white
    mixing = (E * np.sqrt(lam)) @ W.T
    return ICAResult(Xc @ unmixing.T, mixing, unmixing, mean, n_iter, converged)


def _sym_decorrelation(W: np.ndarray) -> np.ndarray:
    """W <- (W W^T)^(-1/2) W: the nearest orthogonal matrix, so all rows update in parallel."""
    s, u = np.linalg.eigh(W @ W.T)
    s = np.clip(s, np.finfo(W.dtype).tiny, None)
    return (u * (1.0 / np.sqrt(s))) @ u.T @ W


def _parallel_logcosh(Xw: np.ndarray, w_init: np.ndarray, max_iter: int, tol: float):
    """Fixed-point iteration W <- E[g(W x) x^T] - E[g'(W x)] W, g = tanh, on white Xw (n x k)."""
    X = np.ascontiguousarray(Xw.T)  # k x n
    n = X.shape[1]
    W = _sym_decorrelation(w_init)
    for it in range(1, max_iter + 1):
        gx = np.tanh(W @ X)
        g_prime = (1.0 - gx**2).mean(axis=1)
        W1 = _sym_decorrelation(gx @ X.T / n - g_prime[:, None] * W)
        lim = np.max(np.abs(np.abs(np.einsum("ij,ij->i", W1, W)) - 1.0))
        W = W1
        if lim < tol:
            return W, it, True
    return W, max_iter, False
