"""A CPU stand-in for RAPIDS cuML, to test the cuML wiring where cuML cannot be installed (no CUDA).

`install(monkeypatch)` makes `from cuml.decomposition import IncrementalPCA` find scikit-learn's IncrementalPCA
(the algorithm cuML's copies, with the same `partial_fit` and fitted attributes) behind cuML's keyword-only
constructor, and reports CUDA as present (`torch.cuda.is_available`). Callers pass CPU devices explicitly.
It returns the log of row counts cuML's `partial_fit` was fed, so a test can show that cuML did the fitting.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import torch
from sklearn.decomposition import IncrementalPCA as SkIPCA


def install(monkeypatch) -> list[int]:
    fed: list[int] = []

    class IncrementalPCA:
        def __init__(
            self, *, n_components=None, whiten=False, copy=True, batch_size=None, verbose=False, output_type=None
        ):
            self._sk = SkIPCA(n_components=n_components, whiten=whiten, copy=copy, batch_size=batch_size)

        def partial_fit(self, X, y=None, *, check_input=True):
            assert isinstance(X, np.ndarray) and X.dtype == np.float64  # cuML input from CPU tensors: numpy, no copy
            fed.append(X.shape[0])
            self._sk.partial_fit(X, check_input=check_input)
            return self

        def __getattr__(self, name):  # fitted attributes: n_samples_seen_, mean_, var_, components_, singular_values_
            return getattr(self._sk, name)

    cuml = types.ModuleType("cuml")
    cuml.decomposition = types.ModuleType("cuml.decomposition")
    cuml.decomposition.IncrementalPCA = IncrementalPCA
    monkeypatch.setitem(sys.modules, "cuml", cuml)
    monkeypatch.setitem(sys.modules, "cuml.decomposition", cuml.decomposition)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return fed
