"""fnscale: functional-network selective fine-tuning of large language models.

The public Python API (docs/api.md): `load_networks`, `build_networks`, `freeze_networks` and `FrozenNetworks`, from
`fnscale.api`; trainer integrations in `fnscale.integrations`. They load on first use, so `import fnscale` (and
`fnscale --help`) does not import torch. `importlib` rather than a `from` import: every `from fnscale import x`
runs this file, so a static import of the entry-layer `fnscale.api` here would close an import cycle.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = ("FrozenNetworks", "Templates", "build_networks", "freeze_networks", "load_networks")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("fnscale.api"), name)
    raise AttributeError(f"module 'fnscale' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
