"""FastICA (logcosh, parallel/symmetric decorrelation) on a small matrix.

Only small matrices reach ICA: Z (tokens x k) for temporal ICA or V_k^T (neurons x k) for
spatial ICA. We whiten exactly here (eigendecomposition of the k x k covariance, ddof=1) and
run the parallel FastICA iteration on the white data, so the unmixing is orthogonal and the
mixing matrix has a closed form:

    X - mean = sources @ mixing_.T,     sources = (X - mean) @ unmixing_.T  (unit variance)

Re-whitening Z exactly also absorbs the small error of the streaming PCA's singular values.
The rotation is scikit-learn's `FastICA(whiten=False, fun="logcosh", algorithm="parallel")` on
the white data (seeded: `random_state=seed`). Only the main process runs it, after the capture passes.
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
        raise UsageError(
            f"ICA of {k} components needs more than {k} samples, got {n}; use more data or fewer components"
        )
    mean = X.mean(axis=0)
    Xc = X - mean
    lam, E = np.linalg.eigh(Xc.T @ Xc / (n - 1))
    lam, E = lam[::-1][:k], E[:, ::-1][:, :k]
    if lam[-1] <= lam[0] * 1e-12:
        raise UsageError(
            f"the data have fewer than {k} independent directions; lower n_components or capture more varied text"
        )
    K = E / np.sqrt(lam)  # features x k whitening
    W, n_iter, converged = _rotate(Xc @ K, seed, max_iter, tol)
    if not converged:
        warnings.warn(
            f"FastICA did not converge in {max_iter} iterations (tol {tol}); the networks may be "
            "unstable: use more tokens, fewer components, or a larger max_iter",
            RuntimeWarning,
            stacklevel=2,
        )
    unmixing = W @ K.T  # W is orthogonal because Xc @ K is white
    mixing = (E * np.sqrt(lam)) @ W.T
    return ICAResult(Xc @ unmixing.T, mixing, unmixing, mean, n_iter, converged)


def _rotate(Xw: np.ndarray, seed: int, max_iter: int, tol: float) -> tuple[np.ndarray, int, bool]:
    """The orthogonal unmixing W (k x k) of white Xw by scikit-learn's parallel logcosh FastICA,
    its iteration count, and whether it converged (scikit-learn only warns when it does not)."""
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    ica = FastICA(whiten=False, fun="logcosh", algorithm="parallel", max_iter=max_iter, tol=tol, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        ica.fit(Xw)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    for w in caught:  # pass on anything else scikit-learn said
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ica.components_, int(ica.n_iter_), converged
