"""FastICA and the full decomposition: planted-network recovery, determinism, refusals."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from fnscale.errors import UsageError
from fnscale.networks import StreamingDecomposer, decompose, fast_ica
from fnscale.networks.pca import _cuml_available


def planted(seed, n_tokens=3000, n_neurons=1000, k=6, size=20, noise=1.0, n_constant=5):
    """Activations = sparse non-Gaussian sources mixed through disjoint sparse networks + noise.

    Each network is `size` neurons (2% of 1000), with weights 0.8-2.0 of random sign; half the
    sources are Laplace, half sparse Bernoulli(0.2) x Gaussian. Neurons get their own offset and
    scale (so standardisation matters) and a few are constant (must not produce NaNs).
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_neurons - n_constant)
    nets = [np.sort(perm[c * size : (c + 1) * size]) for c in range(k)]
    A = np.zeros((n_neurons, k))
    for c, idx in enumerate(nets):
        A[idx, c] = rng.uniform(0.8, 2.0, size) * rng.choice([-1.0, 1.0], size)
    s = np.empty((n_tokens, k))
    s[:, : k // 2] = rng.laplace(size=(n_tokens, k // 2))
    s[:, k // 2 :] = rng.normal(size=(n_tokens, k - k // 2)) * (rng.random((n_tokens, k - k // 2)) < 0.2) * 2.0
    x = s @ A.T + noise * rng.normal(size=(n_tokens, n_neurons))
    x = x * rng.uniform(0.2, 5.0, n_neurons) + rng.normal(scale=3.0, size=n_neurons)
    x[:, n_neurons - n_constant :] = 1.5
    return x, nets


def matched_ious(masks, nets):
    """IoU of each planted network with its Hungarian-matched recovered mask."""
    iou = np.zeros((len(nets), len(masks)))
    for i, net in enumerate(nets):
        for j, m in enumerate(masks):
            got = np.flatnonzero(m)
            inter = np.intersect1d(net, got).size
            iou[i, j] = inter / (net.size + got.size - inter)
    r, c = linear_sum_assignment(-iou)
    return iou[r, c]


def split(x, size=400):
    return [x[i : i + size] for i in range(0, x.shape[0], size)]


# ----------------------------------------------------------------------------- FastICA


def test_fast_ica_unmixes_and_is_deterministic():
    rng = np.random.default_rng(1)
    n = 4000
    s = np.stack([rng.laplace(size=n), rng.uniform(-1, 1, n), rng.normal(size=n) * (rng.random(n) < 0.1)], 1)
    mix = rng.normal(size=(3, 3))
    x = s @ mix.T + np.array([1.0, -2.0, 3.0])
    res = fast_ica(x, seed=7)
    assert res.converged_
    np.testing.assert_allclose(res.sources_ @ res.mixing_.T + res.mean_, x, atol=1e-9)  # square: exact
    np.testing.assert_allclose(res.unmixing_ @ res.mixing_, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(np.cov(res.sources_.T), np.eye(3), atol=1e-9)
    corr = np.abs(np.corrcoef(res.sources_.T, s.T)[:3, 3:])
    assert corr.max(axis=1).min() > 0.99
    np.testing.assert_array_equal(fast_ica(x, seed=7).mixing_, res.mixing_)
    with pytest.raises(UsageError, match="more than 3 samples"):
        fast_ica(x[:3])


def reference_fastica(xw, seed, max_iter=1000, tol=1e-5):
    """Plain numpy parallel logcosh FastICA on white xw (n x k), seeded as scikit-learn seeds it (the reference)."""

    def sym(w):
        s, u = np.linalg.eigh(w @ w.T)
        return (u / np.sqrt(s)) @ u.T @ w

    X = xw.T
    W = sym(np.random.RandomState(seed).normal(size=(X.shape[0], X.shape[0])))
    for _ in range(max_iter):
        gx = np.tanh(W @ X)
        W1 = sym(gx @ X.T / X.shape[1] - (1 - gx**2).mean(axis=1)[:, None] * W)
        done = np.max(np.abs(np.abs(np.einsum("ij,ij->i", W1, W)) - 1)) < tol
        W = W1
        if done:
            return W
    raise AssertionError("reference FastICA did not converge")


def test_fast_ica_matches_the_plain_reference():
    """fast_ica (exact whitening + scikit-learn's rotation) == whitening + the numpy reference iteration, to 1e-10."""
    rng = np.random.default_rng(2)
    s = np.stack(
        [rng.laplace(size=3000), rng.uniform(-1, 1, 3000), rng.exponential(size=3000), rng.normal(size=3000)], 1
    )
    x = s @ rng.normal(size=(4, 4)).T + rng.normal(size=4)
    xc = x - x.mean(0)
    lam, E = np.linalg.eigh(xc.T @ xc / (len(x) - 1))
    lam, E = lam[::-1], E[:, ::-1]
    for seed in (0, 5):
        W = reference_fastica(xc @ (E / np.sqrt(lam)), seed, tol=1e-6)
        res = fast_ica(x, seed=seed, tol=1e-6)
        np.testing.assert_allclose(res.mixing_, (E * np.sqrt(lam)) @ W.T, atol=1e-10)
        np.testing.assert_allclose(res.unmixing_, W @ (E / np.sqrt(lam)).T, atol=1e-10)


def test_fast_ica_warns_when_it_stops_early():
    x = np.random.default_rng(3).laplace(size=(500, 3)) @ np.random.default_rng(4).normal(size=(3, 3))
    with pytest.warns(RuntimeWarning, match="did not converge in 2 iterations"):
        res = fast_ica(x, max_iter=2, tol=1e-12)
    assert not res.converged_ and res.n_iter_ == 2


def test_temporal_mixing_is_the_closed_form():
    """decompose's maps == V_k^T diag(S_k / sqrt(n-1)) W^-1 from an exact SVD of the standardised data and the
    reference FastICA on its white scores (columns matched up to sign and order; tolerance 1e-6 of max |A|)."""
    x, _ = planted(seed=27, n_tokens=2000, n_neurons=60, k=4, size=6, n_constant=0)
    res = decompose(split(x), n_components=4, backend="numpy", oversample=60, tol=1e-10)  # k' >= neurons: exact PCA
    xs = (x - x.mean(0)) / x.std(0, ddof=1)
    U, S, Vt = np.linalg.svd(xs, full_matrices=False)
    n = len(x)
    W = reference_fastica(U[:, :4] * np.sqrt(n - 1), seed=0, tol=1e-10)
    A = Vt[:4].T @ np.diag(S[:4] / np.sqrt(n - 1)) @ np.linalg.inv(W)
    scale = np.abs(A).max()
    for col in res.mixing.T:
        err = min(min(np.abs(col - a).max(), np.abs(col + a).max()) for a in A.T)
        assert err < 1e-6 * scale, err


# ----------------------------------------------------------------------------- recovery


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_temporal_ica_recovers_planted_networks(backend):
    x, nets = planted(seed=21)
    res = decompose(split(x), n_components=6, backend=backend, seed=0)
    assert res.mixing.shape == (1000, 6) and len(res.masks) == 6
    assert res.n_tokens == 3000 and res.converged
    assert np.isfinite(res.mixing).all() and np.isfinite(res.mean).all() and np.isfinite(res.std).all()
    ious = matched_ious(res.masks, nets)
    assert ious.min() >= 0.9, ious
    assert all(m.sum() == 20 for m in res.masks)  # p=98 of 1000 neurons
    assert not any(m[-5:].any() for m in res.masks)  # constant neurons are never selected
    assert (np.diff(res.explained_variance) <= 0).all()  # components sorted by variance


def test_spatial_ica_recovers_planted_networks():
    x, nets = planted(seed=22)
    res = decompose(split(x), n_components=6, kind="spatial", backend="numpy")
    assert res.kind == "spatial" and res.mixing.shape == (1000, 6)
    assert matched_ious(res.masks, nets).min() >= 0.9


def test_explained_variance_adds_up_to_the_pca_subspace():
    x, _ = planted(seed=23)
    res = decompose(split(x), n_components=6, backend="numpy")
    # sources are white, so the networks' variances sum to the variance of the top-6 subspace;
    # 1%: the streaming S_k slightly underestimates it (truncation), the ICA side is exact
    assert res.explained_variance_ratio.sum() == pytest.approx(res.pca_explained_variance_ratio.sum(), rel=1e-2)
    assert 0 < res.explained_variance_ratio.sum() < 1


def test_decompose_is_deterministic_and_input_type_agnostic():
    x, _ = planted(seed=24, n_tokens=1500)
    a = decompose(split(x), 6, backend="numpy", seed=3)
    b = decompose(lambda: iter(split(x)), 6, backend="numpy", seed=3)  # a callable gives fresh passes
    np.testing.assert_array_equal(a.mixing, b.mixing)
    c = decompose([torch.from_numpy(t) for t in split(x)], 6, backend="numpy", seed=3)
    np.testing.assert_allclose(c.mixing, a.mixing, atol=1e-8)
    assert [m.tolist() for m in c.masks] == [m.tolist() for m in a.masks]


def test_standardize_false_and_percentile():
    x, nets = planted(seed=25)
    x = x[:, :995]  # drop the constant neurons
    x = (x - x.mean(0)) / x.std(0)  # unstandardised PCA would chase the large-scale neurons
    res = decompose(split(x), 6, standardize=False, percentile=99.0, backend="numpy")
    assert res.std is None
    assert all(m.sum() == 10 for m in res.masks)  # the top 1% of 995 neurons
    # each 10-neuron mask sits inside one planted 20-neuron network
    assert all(max(np.intersect1d(np.flatnonzero(m), n).size for n in nets) == 10 for m in res.masks)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_components=0), "n_components must be a whole number >= 1"),
        (dict(n_components=2.5), "n_components must be a whole number"),
        (dict(n_components=3, percentile=0), "percentile must be between 0 and 100"),
        (dict(n_components=3, percentile=100), "percentile must be between 0 and 100"),
        (dict(n_components=3, percentile=150.0), "percentile must be between 0 and 100"),
        (dict(n_components=3, kind="both"), "unknown ICA kind 'both'"),
        (dict(n_components=12), "more tokens than components, got 10 tokens"),
        (dict(n_components=9), "more than the 8 neurons"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    x = np.random.default_rng(0).normal(size=(10, 8))
    with pytest.raises(UsageError, match=match):
        decompose([x[:5], x[5:]], backend="numpy", **kwargs)


def test_no_tokens_one_shot_iterators_and_rank_deficiency():
    with pytest.raises(UsageError, match="no tokens"):
        decompose([np.zeros((0, 10)), np.zeros((0, 10))], 2, backend="numpy")
    with pytest.raises(UsageError, match="no tokens"):
        decompose([], 2, backend="numpy")
    x = np.random.default_rng(1).normal(size=(200, 30))
    with pytest.raises(UsageError, match="one-shot iterator"):
        decompose((b for b in [x]), 2, backend="numpy")
    low = np.random.default_rng(2).laplace(size=(200, 2)) @ np.random.default_rng(3).normal(size=(2, 30))
    with pytest.raises(UsageError, match="only 2 independent directions"):
        decompose([low], 4, backend="numpy")
    with pytest.raises(UsageError, match="NaN or inf"):
        decompose([np.full((5, 4), np.inf)], 2, backend="numpy")
    with pytest.raises(UsageError, match="2-D"):
        decompose([np.zeros((2, 3, 4))], 2, backend="numpy")


def test_changed_batches_between_passes_are_refused():
    x = np.random.default_rng(4).laplace(size=(300, 20))
    calls = []

    def shrinking():
        calls.append(1)
        return iter([x[: 300 - 50 * (len(calls) - 1)]])

    with pytest.raises(UsageError, match="same on every pass"):
        decompose(shrinking, 3, backend="numpy")


def test_unavailable_backend_refused_before_reading_data():
    if _cuml_available():
        pytest.skip("cuML is installed here")

    def never():
        raise AssertionError("data must not be read")

    with pytest.raises(UsageError, match="cuML"):
        decompose(never, 3, backend="cuml")


def test_streaming_decomposer_steps_match_decompose():
    x, _ = planted(seed=26, n_tokens=1200)
    dec = StreamingDecomposer(6, backend="numpy")
    assert dec.n_passes == 3 and StreamingDecomposer(6, kind="spatial", standardize=False).n_passes == 1
    for b in split(x):
        dec.update_stats(b)
    dec.merge_stats(lambda s: [s])
    for b in split(x):
        dec.update_pca(b)
    dec.merge_pca(lambda s: [s])
    z = [dec.project(b) for b in split(x)]
    res = dec.finish(z)
    np.testing.assert_allclose(res.mixing, decompose(split(x), 6, backend="numpy").mixing, atol=1e-10)
    with pytest.raises(UsageError, match="projected tokens"):
        dec.finish(None)
