"""Two ranks (torch.distributed, gloo, 2 spawned processes) give the single-process answer.

Each rank fits half the batches, merges statistics and PCA states with all_gather_object in
rank order, projects its half, gathers Z and runs FastICA. Both ranks must hold bit-identical
results. Against one process the statistics agree to 1e-12 and the masks exactly; the PCA
states differ by truncation error (merge order), so both are held to the exact SVD instead:
top-k principal-angle cosines >= 0.999 and singular values within 2%.
"""

import os
import pickle
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fnscale.networks import RunningStats, StreamingDecomposer, merge_across_ranks, torch_all_gather
from fnscale.networks.pca import IncrementalPCA, PCAState
from fnscale.runtime.distributed import exit_process


def _data(seed=31, n_tokens=2400, n_neurons=600, k=5, size=12, noise=1.0):
    """Planted sparse networks (2% of neurons each) driven by Laplace sources, plus noise."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_neurons)
    nets = [np.sort(perm[c * size : (c + 1) * size]) for c in range(k)]
    A = np.zeros((n_neurons, k))
    for c, idx in enumerate(nets):
        A[idx, c] = rng.uniform(0.8, 2.0, size) * rng.choice([-1.0, 1.0], size)
    x = rng.laplace(size=(n_tokens, k)) @ A.T + noise * rng.normal(size=(n_tokens, n_neurons))
    x = x * rng.uniform(0.5, 3.0, n_neurons) + rng.normal(size=n_neurons)
    batches = [x[i : i + 200] for i in range(0, n_tokens, 200)]  # 12 batches
    return batches, nets


def _run(batches, gather=None):
    dec = StreamingDecomposer(5, backend="numpy", seed=0)
    for b in batches:
        dec.update_stats(b)
    dec.merge_stats(gather)
    for b in batches:
        dec.update_pca(b)
    dec.merge_pca(gather)
    z = [dec.project(b) for b in batches]
    res = dec.finish((gather or (lambda o: [o]))(z))
    return dec, res


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        batches, _ = _data()
        mine = batches[rank::world]  # interleaved shares, like split_between_processes on a shuffled set
        dec, res = _run(mine, torch_all_gather)
        # a rank with no data still takes part in every collective (padding ranks under ZeRO)
        _, padded = _run(batches if rank == 0 else [], torch_all_gather)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
            pickle.dump({"stats": dec.stats_, "pca": dec.pca_state(), "res": res, "padded": padded}, fh)
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_process(0)  # as fnscale's commands leave: no interpreter teardown racing gloo's worker threads (a SIGABRT)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ious(masks, nets):
    return [
        max(np.intersect1d(np.flatnonzero(m), n).size / np.union1d(np.flatnonzero(m), n).size for n in nets)
        for m in masks
    ]


def test_two_rank_merge_equals_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in (0, 1))

    # identical on both ranks, bit for bit
    for key in ("mean_", "m2_"):
        np.testing.assert_array_equal(getattr(r0["stats"], key), getattr(r1["stats"], key))
    for key in ("mean_", "components_", "singular_values_"):
        np.testing.assert_array_equal(getattr(r0["pca"], key), getattr(r1["pca"], key))
    np.testing.assert_array_equal(r0["res"].mixing, r1["res"].mixing)
    np.testing.assert_array_equal(r0["padded"].mixing, r1["padded"].mixing)

    # equal to one process over all batches
    batches, nets = _data()
    dec, single = _run(batches)
    assert r0["stats"].count_ == dec.stats_.count_ == 2400
    np.testing.assert_allclose(r0["stats"].mean_, dec.stats_.mean_, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r0["stats"].m2_, dec.stats_.m2_, rtol=1e-12)
    p0, p1 = r0["pca"], dec.pca_state()
    assert p0.n_samples_seen_ == p1.n_samples_seen_ == 2400
    x = np.concatenate(batches)
    _, s, vt = np.linalg.svd((x - x.mean(0)) / x.std(0, ddof=1), full_matrices=False)
    for p in (p0, p1):  # truncation error differs with the merge order; both stay close to exact
        assert np.linalg.svd(p.components_[:5] @ vt[:5].T, compute_uv=False).min() >= 0.999
        np.testing.assert_allclose(p.singular_values_[:5], s[:5], rtol=2e-2)
    corr = np.abs(np.corrcoef(r0["res"].mixing.T, single.mixing.T)[:5, 5:])
    assert np.diag(corr).min() >= 0.999  # same components in the same order
    assert [m.tolist() for m in r0["res"].masks] == [m.tolist() for m in single.masks]
    assert min(_ious(single.masks, nets)) >= 0.9
    # all data on rank 0, none on rank 1: merging with empty states is the identity
    np.testing.assert_array_equal(r0["padded"].mixing, single.mixing)


def test_merge_across_ranks_folds_in_rank_order():
    """With a fake gather the fold is the left-to-right merge, for stats and PCA states alike."""
    batches, _ = _data(n_tokens=900)
    parts = [np.concatenate(batches[i::3]) for i in range(3)]
    stats = [RunningStats().update(p) for p in parts]
    merged = merge_across_ranks(stats[0], lambda s: stats)
    whole = RunningStats().update(np.concatenate(parts))
    np.testing.assert_allclose(merged.mean_, whole.mean_, atol=1e-12)
    np.testing.assert_allclose(merged.m2_, whole.m2_, rtol=1e-12)
    states = [IncrementalPCA(5, backend="numpy").partial_fit(p).get_state() for p in parts]
    folded = merge_across_ranks(states[1], lambda s: states + [PCAState(15)])
    direct = PCAState.merge(PCAState.merge(states[0], states[1]), states[2])
    np.testing.assert_array_equal(folded.components_, direct.components_)
    # outside a process group the default gather is the identity
    assert merge_across_ranks(stats[0]) is stats[0]
