"""What other trainers call: `FunctionalNetworkCallback` for the Hugging Face `Trainer` and TRL's trainers
(`fnscale.integrations.trainer`), and the Axolotl plugin (`fnscale.integrations.axolotl.FunctionalNetworkPlugin`).
Loaded on first use, so importing this package needs neither torch nor transformers.
"""

from __future__ import annotations

import importlib

__all__ = ["FunctionalNetworkCallback"]


def __getattr__(name: str):
    if name == "FunctionalNetworkCallback":
        return importlib.import_module("fnscale.integrations.trainer").FunctionalNetworkCallback
    raise AttributeError(f"module 'fnscale.integrations' has no attribute {name!r}")
