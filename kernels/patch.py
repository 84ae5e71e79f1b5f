"""Shadow a module's forward with an instance attribute, and undo it exactly (no triton needed)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def set_forward(module: torch.nn.Module, forward: Callable) -> Callable[[], None]:
    """Make `module(...)` call `forward`; the returned undo deletes the attribute, restoring the class's
    forward. Refuses a module whose forward is already an instance attribute (an accelerate offload hook,
    another patch): replacing it would drop that wrapper's work."""
    if "forward" in vars(module):
        raise ValueError(f"{type(module).__name__}.forward is already patched (e.g. by an accelerate hook)")
    module.forward = forward

    def undo() -> None:
        if vars(module).get("forward") is forward:
            del module.forward

    return undo
