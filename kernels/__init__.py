"""Fused mask kernels (Triton) and their torch reference; installed as fnscale.kernels.

One contract, `masked = x * mask` (mask: 1-D over the intermediate dim, broadcast over tokens):
- torch reference: `gated_act_mul_mask(gate, up, mask, act)` = act(gate) * up * mask,
  `act_mask(h, mask, act)` = act(h) * mask, with act in ACTIVATIONS ("silu", "gelu_tanh").
- Triton (fused forward and backward): `triton_gated_act_mul_mask`, `triton_act_mask`, and drop-in
  MLP patches `patch_gated_mlp(mlp, mask, act)` / `patch_gpt2_mlp(mlp, mask, act)` returning an undo.

Importing this package never imports triton: the Triton names load `triton_mask` on first access, so
machines without triton (or CUDA) can import it. TRITON_INTERPRET=1 must be set before that first
access to run the kernels on CPU (triton reads it when the kernels are defined).
"""

from __future__ import annotations

import functools
import os

import torch

from .patch import set_forward
from .reference import ACTIVATIONS, act_mask, activation, gated_act_mul_mask

_TRITON_NAMES = (
    "triton_gated_act_mul_mask",
    "triton_act_mask",
    "patch_gated_mlp",
    "patch_gpt2_mlp",
    "GatedActMulMask",
    "ActMask",
)

__all__ = [
    "ACTIVATIONS",
    "activation",
    "act_mask",
    "gated_act_mul_mask",
    "set_forward",
    "interpret_mode",
    "triton_importable",
    "triton_available",
    *_TRITON_NAMES,
]


def interpret_mode() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels run on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_importable() -> bool:
    """True when `import triton` works (cached: importing it is slow and the answer does not change)."""
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install raises more than ImportError
        return False
    return True


def triton_available() -> bool:
    """True when the Triton ops can run here: triton imports and CUDA is present, or interpret mode is on."""
    return triton_importable() and (torch.cuda.is_available() or interpret_mode())


def __getattr__(name: str):
    if name in _TRITON_NAMES:
        from . import triton_mask

        return getattr(triton_mask, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
