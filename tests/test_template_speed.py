"""Issue 13 A: statistics folded into the PCA pass (2 passes, not 3), the overflow-safe activation cache,
`--cache-budget-gb auto`. Every fast path is checked against the exact 3-pass / float32 path on fresh inputs."""

import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers_cuml import install as install_cuml_standin
from transformers import AutoModelForCausalLM

from fnscale.errors import UsageError
from fnscale.networks import cache
from fnscale.networks.capture import ActivationCapture
from fnscale.networks.decompose import StreamingDecomposer, decompose
from fnscale.networks.pca import IncrementalPCA
from fnscale.networks.templates import compare
from fnscale.recipes.build_networks import build_templates


def _min_cos(a, b):
    """Smallest principal-angle cosine between the row spaces of a and b (k x D, orthonormal rows)."""
    return float(np.linalg.svd(a @ b.T, compute_uv=False).min())


def _planted(rng, tokens=4000, neurons=200, k=5):
    """k independent (Laplace) sources, each driving its own 10% of the neurons (a network), plus noise; neuron
    scales span 6 orders of magnitude, with offsets, and a first stretch of tokens is 5x quieter (running stds drift)."""
    maps = 0.02 * rng.normal(size=(k, neurons))
    for c, block in enumerate(np.array_split(rng.permutation(neurons - 1)[: k * neurons // 10], k)):
        maps[c, block] = 2 + np.abs(rng.normal(size=block.size))
    x = rng.laplace(size=(tokens, k)) @ maps + 0.3 * rng.normal(size=(tokens, neurons))
    x[:300] *= 0.2
    x = x * np.exp(rng.uniform(-7, 7, neurons)) + rng.normal(size=neurons) * 10
    x[:, -1] = 4.0  # a constant neuron (in no network)
    return x


def _matched_ious(a, b):
    """IoU of a's masks with b's, components matched one-to-one (Hungarian on IoU)."""
    from scipy.optimize import linear_sum_assignment

    iou = np.array([[(ma & mb).sum() / max((ma | mb).sum(), 1) for mb in b.masks] for ma in a.masks])
    rows, cols = linear_sum_assignment(-iou)
    return iou[rows, cols]


def test_rescale_is_exact_without_truncation():
    """PCA of x*s1 rescaled to s2 equals the PCA of x*s2 when nothing is truncated (keep >= neurons)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12))
    s1, s2 = np.exp(rng.uniform(-2, 2, 12)), np.exp(rng.uniform(-2, 2, 12))
    a = (
        IncrementalPCA(12, oversample=0, backend="numpy", scale=s1, chunk_size=64)
        .partial_fit(x)
        .rescale(s2)
        .get_state()
    )
    b = IncrementalPCA(12, oversample=0, backend="numpy", scale=s2, chunk_size=64).partial_fit(x).get_state()
    np.testing.assert_allclose(a.mean_, b.mean_, rtol=1e-12)
    np.testing.assert_allclose(a.singular_values_, b.singular_values_, rtol=1e-9)
    np.testing.assert_allclose(np.abs(a.components_ @ b.components_.T), np.eye(12), atol=1e-7)


def _fit_folded_and_three_pass(batches, k, **kw):
    """The PCA stage both ways: statistics folded into the PCA pass, and the exact statistics pass first."""
    two, three = (StreamingDecomposer(k, backend="numpy", fold_stats=fold, **kw) for fold in (True, False))
    for b in batches:
        two.update(b)
        three.update_stats(b)
    two.merge(lambda state: [state])
    for b in batches:
        three.update_pca(b)
    return two, three


def _assert_untruncated_two_passes_equal_three(batches, k):
    """With k' >= neurons nothing is truncated: the folded pass gives the 3-pass PCA state and projections
    (rtol 1e-9; the ICA after them is compared in the tests below, its own tolerance is ~sqrt(tol))."""
    decs = two, three = _fit_folded_and_three_pass(batches, k, oversample=batches[0].shape[1])
    s2, s3 = two.pca_state(), three.pca_state()
    np.testing.assert_allclose(two.stats_.m2_, three.stats_.m2_, rtol=1e-12)
    np.testing.assert_allclose(s2.singular_values_[:k], s3.singular_values_[:k], rtol=1e-9)
    np.testing.assert_allclose(s2.total_m2_, s3.total_m2_, rtol=1e-9)
    z2, z3 = (np.concatenate([d.project(b) for b in batches]) for d in decs)
    np.testing.assert_allclose(z2, z3, rtol=0, atol=1e-9 * np.abs(z3).max())


def test_two_passes_equal_three_when_nothing_is_truncated(tiny_gpt2):
    x = _planted(np.random.default_rng(1), tokens=3000, neurons=20, k=3)
    _assert_untruncated_two_passes_equal_three([x[i : i + 250] for i in range(0, len(x), 250)], 3)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    with ActivationCapture(model) as cap:
        batches = [cap.run(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in _samples(48, seed=1)]
    _assert_untruncated_two_passes_equal_three(batches, 4)


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_two_passes_match_three_with_truncation(seed):
    """D=200, k=5, k'=15: the running standardisation loses nothing measurable against the exact 3-pass path
    (tolerances: top-k subspace cosines >= 0.999, explained variance ratios within 1e-3, masks IoU >= 0.99)."""
    rng = np.random.default_rng(seed)
    x = _planted(rng)
    batches = [x[i : i + 200] for i in range(0, len(x), 200)]
    three = decompose(batches, 5, percentile=90, backend="numpy")
    two = decompose(batches, 5, percentile=90, backend="numpy", fold_stats=True)
    xs = (x - x.mean(0)) / np.where(x.std(0, ddof=1) > 0, x.std(0, ddof=1), np.inf)
    exact = np.linalg.svd(xs, full_matrices=False)[2][:5]
    q_two, q_three = (np.linalg.qr(d.mixing)[0].T for d in (two, three))  # span of the maps = top-5 PCA subspace
    assert _min_cos(q_two, exact) >= 0.999 and _min_cos(q_two, q_three) >= 0.999
    np.testing.assert_allclose(two.pca_explained_variance_ratio, three.pca_explained_variance_ratio, atol=1e-3)
    np.testing.assert_allclose(two.explained_variance_ratio, three.explained_variance_ratio, atol=1e-3)
    assert _matched_ious(two, three).min() >= 0.99


@pytest.mark.parametrize("backend", ["cuml", "auto"])
def test_cuml_serves_the_folded_pass(monkeypatch, backend):
    """`cuml` (and `auto` with cuML and CUDA present) runs cuML in the 2-pass folded path, which swapped it for
    torch before. The stand-in (tests/helpers_cuml.py) fits every batch; fnscale rescales and merges. Against the
    numpy folded path: PCA subspaces cosines >= 0.9999, explained variance ratios within 1e-4, masks IoU >= 0.99;
    against the exact SVD of the standardised data: cosines >= 0.999 (the 3-pass test's tolerances above)."""
    fed = install_cuml_standin(monkeypatch)
    rng = np.random.default_rng(6)
    x = _planted(rng)
    batches = [torch.from_numpy(x[i : i + 200]) for i in range(0, len(x), 200)]
    cuml = decompose(batches, 5, percentile=90, backend=backend, device="cpu", fold_stats=True)
    ref = decompose(batches, 5, percentile=90, backend="numpy", fold_stats=True)
    assert cuml.extra["backend"] == "cuml" and sum(fed) == len(x)
    xs = (x - x.mean(0)) / np.where(x.std(0, ddof=1) > 0, x.std(0, ddof=1), np.inf)
    exact = np.linalg.svd(xs, full_matrices=False)[2][:5]
    q_cuml, q_ref = (np.linalg.qr(d.mixing)[0].T for d in (cuml, ref))
    assert _min_cos(q_cuml, q_ref) >= 0.9999 and _min_cos(q_cuml, exact) >= 0.999
    np.testing.assert_allclose(cuml.explained_variance_ratio, ref.explained_variance_ratio, atol=1e-4)
    assert _matched_ious(cuml, ref).min() >= 0.99


def test_cache_encoding_is_overflow_safe():
    rng = np.random.default_rng(5)
    acts = (rng.normal(size=(300, 64)) * np.exp(rng.uniform(-10, 14, 64))).astype(np.float32)  # up to ~1e7
    with np.errstate(over="ignore"):
        assert np.isinf(acts.astype(np.float16)).any()  # a plain fp16 cache would overflow here
    values, scale = cache.encode(torch.from_numpy(acts))
    assert values.dtype == torch.float16 and values.device.type == "cpu" and torch.isfinite(values).all()
    _, exp = np.frexp(np.abs(acts).max(0))
    np.testing.assert_array_equal(scale.numpy(), np.ldexp(np.float32(1.0), exp - 15))  # exact powers of two
    back = cache.decode(values, scale).numpy()
    peak = np.abs(acts).max(0)
    assert (
        np.abs(back - acts) <= 2.0**-11 * np.abs(acts) + 2.0**-24 * peak
    ).all()  # fp16 rounding, relative to each neuron
    odd = torch.tensor([[0.0, 1e-42, 3e38], [0.0, -1e-42, -1e38]])  # a dead neuron, subnormal and huge peaks
    v, s = cache.encode(odd)
    assert (s > 0).all() and torch.isfinite(s).all() and torch.isfinite(v).all()
    np.testing.assert_allclose(cache.decode(v, s).numpy(), odd.numpy(), rtol=2.0**-11, atol=1e-44)


def test_cache_budget_parsing_and_plan(monkeypatch, caplog):
    assert cache.parse_budget("auto") is None and cache.parse_budget("2.5") == 2.5 and cache.parse_budget(0) == 0.0
    for bad in ("lots", "-1", "nan"):
        with pytest.raises(UsageError, match="auto. or a number"):
            cache.parse_budget(bad)
    monkeypatch.setattr(cache, "available_memory_bytes", lambda: 8 * 2**30)
    caplog.set_level(logging.INFO, logger="fnscale.networks.cache")
    assert cache.plan_cache("auto", 25_000, 17_280, 1)  # 0.80 GB of 4 GB allowed
    assert (
        "on, 1 forward pass" in caplog.text and "0.80 GB" in caplog.text and "50% of 8.00 GB available" in caplog.text
    )
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 ranks share the host: 0.5 GB each
    assert not cache.plan_cache("auto", 25_000, 17_280, 1)
    assert (
        "off, streaming" in caplog.text and "/ 8 local processes" in caplog.text and "2 forward passes" in caplog.text
    )
    assert not cache.plan_cache("0", 10, 10, 1) and cache.plan_cache("1", 10, 10, 1)
    assert not cache.plan_cache("auto", 10, 10, 0)  # spatial ICA: one pass, nothing to replay


def _forwards(model):
    calls = {"n": 0}
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    return calls


def _samples(n=48, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(4, 60, size=rng.integers(6, 20))) for _ in range(n)]


def test_cached_masks_match_float32_streaming_beyond_fp16_range(tiny_llama):
    """Weights scaled so intermediate activations pass 65504: the cached path (1 forward pass) gives the
    masks of the uncached float32 path (2 forward passes), IoU >= 0.99 per matched component."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.mul_(1e7)  # intermediate activations from ~0.03 to ~3e5
    with ActivationCapture(model) as cap:
        ids = torch.tensor([_samples(1)[0]])
        acts = cap.run(ids, torch.ones_like(ids))
    assert np.abs(acts).max() > 65504  # beyond fp16
    calls = _forwards(model)
    kw = dict(n_components=4, percentile=90.0, batch_size=8, seed=0, progress=False)
    cached = build_templates(model, _samples(), cache_budget_gb="auto", **kw)
    assert calls["n"] == 6  # 48 samples / batch 8, one pass
    streamed = build_templates(model, _samples(), cache_budget_gb=0, **kw)
    assert calls["n"] == 6 + 12  # two passes
    ious = [iou for _, _, iou in compare(cached, streamed).pairs]
    assert len(ious) == 4 and min(ious) >= 0.99, ious


def test_two_passes_match_three_on_a_model(tiny_gpt2):
    """A random tiny GPT-2 has a nearly flat spectrum (top singular values 180, 172, 167, 149), so its ICA
    rotation is ill-posed and masks are no fair comparison; its top-4 principal subspace is: the folded path's
    matches the exact 3-pass path's (principal-angle cosines >= 0.999), as do the explained variances (rtol 1e-3)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    with ActivationCapture(model) as cap:
        batches = [cap.run(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in _samples(96, seed=1)]
    two, three = (d.pca_state() for d in _fit_folded_and_three_pass(batches, 4))
    assert _min_cos(two.components_[:4], three.components_[:4]) >= 0.999
    np.testing.assert_allclose(two.explained_variance_ratio_[:4], three.explained_variance_ratio_[:4], rtol=1e-3)


def test_cli_refuses_bad_cache_budget(tiny_llama, sft_file, tmp_path):
    from fnscale.cli.app import cli

    res = CliRunner().invoke(
        cli, ["templates", "build", tiny_llama, sft_file, "--cache-budget-gb", "lots", "--output", str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "--cache-budget-gb 'lots' must be `auto` or a number of GB >= 0" in res.output
    assert "Traceback" not in res.output
