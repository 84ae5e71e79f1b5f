"""Functional-network discovery: capture, streaming PCA, FastICA, templates.

Public API: `decompose` (single process) and `StreamingDecomposer` (per-rank passes with
merges in between), the mergeable states `RunningStats` / `PCAState` with
`merge_across_ranks`, and `Templates` (the on-disk result).
"""

from fnscale.networks.decompose import Decomposition, StreamingDecomposer, decompose
from fnscale.networks.ica import ICAResult, fast_ica
from fnscale.networks.pca import IncrementalPCA, PCAState, resolve_backend
from fnscale.networks.stats import RunningStats, merge_across_ranks, torch_all_gather
from fnscale.networks.templates import Templates, compare

__all__ = [
    "Decomposition",
    "ICAResult",
    "IncrementalPCA",
    "PCAState",
    "RunningStats",
    "StreamingDecomposer",
    "Templates",
    "compare",
    "decompose",
    "fast_ica",
    "merge_across_ranks",
    "resolve_backend",
    "torch_all_gather",
]
