"""Streaming statistics and incremental PCA against exact numpy references.

Tolerances: stats are exact up to float64 rounding (1e-10 relative); PCA is approximate by
truncation to k' = k + oversample after each chunk, so each backend must match the exact SVD of
the standardised data to principal-angle cosines >= 0.99 on the top-k subspace (observed
> 0.9999) and singular values to 1%. The cuML backend also runs on the CPU here, through a stand-in
(tests/helpers_cuml.py: scikit-learn's IncrementalPCA behind cuML's import path, CUDA reported present).
"""

import numpy as np
import pytest
import torch
from helpers_cuml import install as install_cuml_standin

from fnscale.errors import UsageError
from fnscale.networks.pca import MIN_CHUNK_GPU, IncrementalPCA, PCAState, _cuml_available, merge, resolve_backend
from fnscale.networks.stats import RunningStats
from fnscale.networks.stats import merge as merge_stats


def _lowrank(seed, n=2400, d=300, r=20, noise=1.0):
    """Tokens x neurons with a decaying r-dim signal, per-neuron offsets/scales, and noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, r)))[0]
    latent = rng.normal(size=(n, r)) * np.linspace(6.0, 2.0, r) * np.sqrt(d / r)
    x = latent @ basis.T + noise * rng.normal(size=(n, d))
    return x * rng.uniform(0.5, 3.0, d) + rng.normal(scale=5.0, size=d)


def _exact_pca(x):
    xs = (x - x.mean(0)) / x.std(0, ddof=1)
    _, s, vt = np.linalg.svd(xs - xs.mean(0), full_matrices=False)
    return s, vt


def _cosines(va, vb):
    """Cosines of the principal angles between the row spaces of va and vb (orthonormal rows)."""
    return np.linalg.svd(va @ vb.T, compute_uv=False)


def _batches(x, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(x[i : i + s])
        i += s
    out.append(x[i:])
    return out


# ----------------------------------------------------------------------------- stats


def test_running_stats_equal_numpy_within_1e10():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(1000, 50)) * rng.uniform(0.01, 100, 50) + rng.normal(scale=1e3, size=50)
    st = RunningStats()
    for b in _batches(x, [1, 0, 7, 300, 2, 190]):  # uneven sizes, an empty batch, a single row
        st.update(b)
    assert st.count_ == 1000
    np.testing.assert_allclose(st.mean_, x.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(st.var(), x.var(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(st.var(ddof=0), x.var(0), rtol=1e-10)


def test_running_stats_blocks_large_batches(monkeypatch):
    import fnscale.networks.stats as stats

    monkeypatch.setattr(stats, "_BLOCK_ELEMENTS", 64)  # 2 rows per float64 block of 30 neurons
    x = np.random.default_rng(14).normal(size=(301, 30)) * 5 + 3
    st = RunningStats().update(x)
    np.testing.assert_allclose(st.mean_, x.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(st.var(), x.var(0, ddof=1), rtol=1e-10)


def test_running_stats_accepts_torch_and_low_precision():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    st_np, st_t = RunningStats(), RunningStats()
    for b in _batches(x, [50, 70]):
        st_np.update(b)
        st_t.update(torch.from_numpy(b))
    np.testing.assert_allclose(st_t.mean_, st_np.mean_, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st_t.m2_, st_np.m2_, rtol=1e-12)
    bf = torch.from_numpy(x).to(torch.bfloat16)
    ref = bf.to(torch.float64).numpy()
    np.testing.assert_allclose(RunningStats().update(bf).mean_, ref.mean(0), rtol=1e-10, atol=1e-12)


def test_stats_merge_equals_one_pass_over_concatenation():
    rng = np.random.default_rng(12)
    a, b = rng.normal(3.0, 2.0, size=(123, 40)), rng.normal(-1.0, 0.5, size=(457, 40))
    merged = merge_stats(RunningStats().update(a), RunningStats().update(b))
    whole = RunningStats().update(np.concatenate([a, b]))
    assert merged.count_ == whole.count_ == 580
    np.testing.assert_allclose(merged.mean_, whole.mean_, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.m2_, whole.m2_, rtol=1e-10)
    # the empty state is the identity on both sides
    assert merge_stats(RunningStats(), merged).count_ == 580
    np.testing.assert_array_equal(merge_stats(merged, RunningStats()).mean_, merged.mean_)


def test_stats_constant_neurons_and_bad_input():
    x = np.random.default_rng(13).normal(size=(100, 4))
    x[:, 1] = 7.25  # constant
    x[:, 2] = 0.0  # dead
    st = RunningStats().update(x[:60]).update(x[60:])
    assert st.constant_mask().tolist() == [False, True, True, False]
    inv = st.inverse_std()
    assert np.isfinite(inv).all() and inv[1] == 0 and inv[2] == 0
    with pytest.raises(UsageError, match="NaN or inf"):
        RunningStats().update(np.array([[1.0, np.nan]]))
    with pytest.raises(UsageError, match="2-D"):
        RunningStats().update(np.zeros(5))
    with pytest.raises(UsageError, match="same layers"):
        merge_stats(st, RunningStats().update(np.zeros((3, 5))))
    with pytest.raises(UsageError, match="0 tokens"):
        RunningStats().var()


# ----------------------------------------------------------------------------- PCA backends

BACKENDS = [
    pytest.param("numpy", "cpu", id="numpy"),
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("torch", "cuda", id="torch-cuda"),
    pytest.param("cuml", None, id="cuml"),
    pytest.param("cuml", "cpu", id="cuml-standin"),
]


def _require(backend, device, monkeypatch) -> list[int] | None:
    """Skip what this machine cannot run; for the cuML stand-in, install it and return the rows cuML is fed."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    if backend == "cuml" and device == "cpu":
        return install_cuml_standin(monkeypatch)
    if backend == "cuml" and not _cuml_available():
        pytest.skip("cuML is not installed or CUDA is not available")
    return None


def _fit(x, k, backend, device, batch=200, **kw):
    st = RunningStats().update(x)
    pca = IncrementalPCA(k, backend=backend, device=device, shift=st.mean_, scale=st.inverse_std(), **kw)
    for i in range(0, x.shape[0], batch):
        pca.partial_fit(x[i : i + batch])
    return pca


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("seed", [101, 202])
def test_backend_matches_exact_svd(backend, device, seed, monkeypatch):
    fed = _require(backend, device, monkeypatch)
    k = 8
    x = _lowrank(seed)
    s, vt = _exact_pca(x)
    pca = _fit(x, k, backend, device)
    assert pca.n_samples_seen_ == x.shape[0]
    assert pca.components_.shape == (k, x.shape[1])
    assert _cosines(pca.components_, vt[:k]).min() >= 0.99
    np.testing.assert_allclose(pca.singular_values_, s[:k], rtol=1e-2)
    np.testing.assert_allclose(pca.explained_variance_ratio_, s[:k] ** 2 / (s**2).sum(), rtol=2e-2)
    np.testing.assert_allclose(pca.components_ @ pca.components_.T, np.eye(k), atol=1e-8)
    assert np.abs(pca.mean_).max() < 1e-10  # standardised data has zero mean
    if fed is not None:
        assert sum(fed) == x.shape[0]  # cuML fitted every row


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_pca_merge_of_halves_equals_full_fit(backend, device, monkeypatch):
    _require(backend, device, monkeypatch)
    k = 8
    x = _lowrank(303)
    full = _fit(x, k, backend, device)
    st = RunningStats().update(x)  # both halves are standardised with the global statistics
    kw = dict(backend=backend, device=device, shift=st.mean_, scale=st.inverse_std())
    a = IncrementalPCA(k, **kw).partial_fit(x[:1100]).get_state()
    b = IncrementalPCA(k, **kw).partial_fit(x[1100:]).get_state()
    m = merge(a, b)
    f = full.get_state()
    assert m.n_samples_seen_ == f.n_samples_seen_ == x.shape[0]
    np.testing.assert_allclose(m.mean_, f.mean_, atol=1e-12)
    assert m.total_m2_ == pytest.approx(f.total_m2_, rel=1e-10)
    assert _cosines(m.components_[:k], f.components_[:k]).min() >= 0.999
    np.testing.assert_allclose(m.singular_values_[:k], f.singular_values_[:k], rtol=1e-3)


def test_numpy_update_agrees_with_sklearn_incremental_pca():
    """Our stacked update is scikit-learn's; same batches, same k', same answer."""
    from sklearn.decomposition import IncrementalPCA as SkIPCA

    x = _lowrank(404, n=1200, d=120)
    ours = IncrementalPCA(10, oversample=0, backend="numpy", chunk_size=100)
    sk = SkIPCA(10)
    for i in range(0, 1200, 100):
        ours.partial_fit(x[i : i + 100])
        sk.partial_fit(x[i : i + 100])
    np.testing.assert_allclose(ours.singular_values_, sk.singular_values_, rtol=1e-8)
    assert _cosines(ours.components_, sk.components_).min() >= 1 - 1e-8
    np.testing.assert_allclose(ours.mean_, sk.mean_, atol=1e-12)


def test_cuml_fits_the_chunks_and_agrees_with_numpy(monkeypatch):
    """cuML (the stand-in) fits each batch in near-equal chunks, fnscale merges the batch states; the result matches
    the numpy backend to principal-angle cosines >= 1 - 1e-4 and singular values to 1e-3 (the two truncate at
    different steps), and the exact SVD as every backend does (test above)."""
    fed = install_cuml_standin(monkeypatch)
    assert resolve_backend("auto") == "cuml"
    x = _lowrank(707)
    cuml, ref = _fit(x, 8, "cuml", "cpu"), _fit(x, 8, "numpy", None)
    assert cuml.backend_ == "cuml" and fed == [50] * 48  # 12 batches of 200 rows, 4 chunks each (chunk size 64)
    assert cuml.n_samples_seen_ == x.shape[0]
    assert _cosines(cuml.components_, ref.components_).min() >= 1 - 1e-4
    np.testing.assert_allclose(cuml.singular_values_, ref.singular_values_, rtol=1e-3)
    np.testing.assert_allclose(cuml.get_state().total_m2_, ref.get_state().total_m2_, rtol=1e-10)
    s, vt = _exact_pca(x)
    assert _cosines(cuml.components_, vt[:8]).min() >= 0.99
    st = RunningStats().update(x)
    xs = (x[:50] - st.mean_) * st.inverse_std()
    np.testing.assert_allclose(cuml.transform(x[:50]), (xs - cuml.mean_) @ cuml.components_.T, atol=1e-10)


def test_chunk_size_per_device():
    """At least MIN_CHUNK_GPU rows per update on a GPU (no CUDA needed to construct), 2 k' (>= 64) on the CPU."""
    assert IncrementalPCA(8, backend="torch", device="cuda").chunk_size == MIN_CHUNK_GPU >= 1024
    assert IncrementalPCA(8, oversample=600, backend="torch", device="cuda").chunk_size == 2 * 608
    assert IncrementalPCA(8, backend="torch", device="cpu").chunk_size == 64
    assert IncrementalPCA(8, oversample=40, backend="numpy").chunk_size == 96
    assert IncrementalPCA(8, backend="torch", device="cuda", chunk_size=32).chunk_size == 32  # an explicit size wins


def test_torch_and_numpy_backends_agree_and_accept_tensors():
    x = _lowrank(505, n=600, d=80)
    a = IncrementalPCA(5, backend="numpy").partial_fit(x)
    b = IncrementalPCA(5, backend="torch", device="cpu").partial_fit(torch.from_numpy(x).float())
    assert _cosines(a.components_, b.components_).min() >= 1 - 1e-6
    np.testing.assert_allclose(a.transform(x[:10]), b.transform(x[:10]), rtol=1e-4, atol=1e-4)


def test_rank_deficient_and_empty_states():
    rng = np.random.default_rng(606)
    x = rng.normal(size=(100, 3)) @ rng.normal(size=(3, 40))  # rank 3
    st = IncrementalPCA(5, backend="numpy").partial_fit(x).get_state()
    assert st.components_.shape[0] == 3  # directions with no variance are dropped, not invented
    assert np.isfinite(st.components_).all()
    empty = PCAState(15)
    assert merge(empty, st).n_samples_seen_ == 100
    assert merge(st, empty).components_.shape == st.components_.shape
    with pytest.raises(UsageError, match="seen no data"):
        IncrementalPCA(2, backend="numpy").components_


def test_backend_selection_and_refusals():
    with pytest.raises(UsageError, match="unknown PCA backend 'magic'"):
        resolve_backend("magic")
    assert resolve_backend("numpy") == "numpy"
    assert resolve_backend("sklearn") == resolve_backend("SKLearn") == "numpy"  # the former name stays an alias
    assert IncrementalPCA(2, backend="sklearn").backend_ == "numpy"
    assert resolve_backend("torch") == "torch"
    if not _cuml_available():
        with pytest.raises(UsageError, match="--pca-backend cuml needs RAPIDS cuML"):
            resolve_backend("cuml")
        expected = "torch" if torch.cuda.is_available() else "numpy"
        assert resolve_backend("auto") == expected
    with pytest.raises(UsageError, match="n_components must be >= 1"):
        IncrementalPCA(0, backend="numpy")
    pca = IncrementalPCA(2, backend="numpy").partial_fit(np.random.default_rng(0).normal(size=(20, 6)))
    with pytest.raises(UsageError, match="earlier batches had 6"):
        pca.partial_fit(np.zeros((4, 7)))
