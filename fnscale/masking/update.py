"""Update masks (`--mask-effect update`): masked neurons stay in the forward pass, their weights get no update.

Forward masks (`apply`) zero activations during training only, so the rest of the model learns around a
hole that is gone at inference (a train/inference mismatch). Update masks leave the forward pass alone and
stop the masked slices from moving: a gradient hook on each tensor holding masked slices zeroes their
gradient (so clipping and AdamW's moments never see it), and `MaskedWeightGuard.restore()` after each step
undoes weight decay (ZeRO-3 full FT, where slices cannot be written: those tensors get no decay instead).

`--no-train-attention` (`freeze_outside_mlps`) is the rule for the rest of the model: only the MLP weights
(and their LoRA adapters) train; attention, embeddings, norms and the LM head are frozen.
"""

from __future__ import annotations

from torch import nn

from fnscale.errors import UsageError
from fnscale.models.mlp import find_mlp_layers


class GradientHold:
    """Gradient hooks that zero the masked slices of each tensor (`slices` from `guard.masked_slices`);
    `remove()` takes them off (idempotent)."""

    def __init__(self, slices):
        self._handles = [
            s.param.register_hook(lambda grad, s=s: grad.index_fill(s.dim, s.on_device(), 0.0)) for s in slices
        ]
        self.num_tensors = len(self._handles)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()


def freeze_outside_mlps(model: nn.Module) -> int:
    """Freeze every parameter outside the decoder MLPs (attention, embeddings, norms, LM head, and LoRA
    adapters on them); returns how many tensors were frozen. MLP weights keep their trainable flag."""
    in_mlp = {id(p) for layer in find_mlp_layers(model) for p in layer.mlp.parameters()}
    frozen = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in in_mlp:
            p.requires_grad_(False)
            frozen += 1
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError(
            "--no-train-attention left nothing to train (no trainable MLP weights); add MLP modules to "
            "--lora-target-modules or drop --no-train-attention"
        )
    return frozen
