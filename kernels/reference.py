"""Torch reference for the mask ops: one contract, `masked = x * mask`.

These are the eager definitions the Triton kernels are tested against. `mask` is a 1-D tensor over
the last (intermediate) dimension, broadcast over tokens; it is cast to the activation dtype so the
result keeps the input dtype (a 0/1 mask is exact in every float dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh")


def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """`act(x)` for the supported names: "silu" (Llama, Qwen, Mistral) and "gelu_tanh" (Gemma, GPT-2 gelu_new)."""
    if act == "silu":
        return F.silu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def gated_act_mul_mask(gate: torch.Tensor, up: torch.Tensor, mask: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """`act(gate) * up * mask`: the masked input of a gated MLP's down projection."""
    return activation(gate, act) * up * mask.to(gate.dtype)


def act_mask(h: torch.Tensor, mask: torch.Tensor, act: str = "gelu_tanh") -> torch.Tensor:
    """`act(h) * mask`: the masked input of a non-gated MLP's down projection (e.g. GPT-2's c_proj)."""
    return activation(h, act) * mask.to(h.dtype)
