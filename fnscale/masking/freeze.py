"""`freeze_networks`: the masks `fnscale train` applies, for any training loop (the engine of `fnscale.api`).

It builds the masks from templates as `setup_masks` does (component union, random control, chosen layers) and
installs the same pieces: `masked_slices` snapshotted by a `MaskedWeightGuard`, `GradientHold` hooks for update
masks, `apply_masks` hooks for forward masks, LoRA slices zeroed, all held by a `Masker`. One process builds the
same masks as every other (templates are read from the same file, the random control is seeded), so nothing is
broadcast. Not covered: ZeRO-3 partitioned weights (refused: their slices cannot be written; use `fnscale train`)
and `--optimizer-slices` (it swaps parameters under an optimizer the caller already built).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from fnscale.errors import UsageError
from fnscale.masking.build import MODES, build_masks
from fnscale.masking.guard import MaskedWeightGuard, masked_slices
from fnscale.masking.setup import Masker
from fnscale.masking.update import GradientHold
from fnscale.models.mlp import find_mlp_layers
from fnscale.networks.controls import random_like
from fnscale.networks.templates import Templates
from fnscale.preflight import parse_component_ids, parse_layers

EFFECTS = ("update", "forward")
CONTROLS = (None, "random")


class FrozenNetworks:
    """Functional networks frozen on a model by `freeze_networks`.

    `restore()` after every optimizer step writes the masked slices back (undoing weight decay) and re-zeroes the
    LoRA slices; `remove()` takes every hook off and restores once more, so the model runs unmasked and its masked
    neurons' weights equal those at `freeze_networks` time. `verify()` names the tensors whose masked slices moved.
    """

    def __init__(self, masker: Masker, components: list[int], mode: str, effect: str, control: str | None):
        self._masker = masker
        self.components, self.mode, self.effect, self.control = components, mode, effect, control
        self.removed = False

    @property
    def masks(self) -> dict[int, torch.Tensor]:
        """Per masked layer, a float vector over its neurons: 1 = trained, 0 = frozen."""
        return self._masker.masks

    @property
    def site(self) -> str:
        return self._masker.site

    def restore(self) -> None:
        self._masker.after_step()

    def verify(self) -> list[str]:
        return self._masker.guard.verify()

    def remove(self) -> None:
        """Idempotent."""
        if not self.removed:
            self._masker.remove()
            self.removed = True

    def stats(self) -> dict[str, float]:
        """Masked neurons per layer and in total (the figures `fnscale train` logs)."""
        return self._masker.stats()

    def __enter__(self) -> FrozenNetworks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def as_templates(networks: Templates | str | os.PathLike) -> Templates:
    """Templates as given, or read from a networks file (fnscale's or FunctionalNetworksSFT's JSON)."""
    return networks if isinstance(networks, Templates) else Templates.load(networks)


def freeze_networks(
    model: nn.Module,
    networks: Templates | str | os.PathLike,
    components: int | Iterable[int] | str,
    mode: str = "lesion",
    *,
    effect: str = "update",
    control: str | None = None,
    seed: int = 0,
    layers: Iterable[int] | str | None = None,
    kernel: str = "auto",
    offload: bool = False,
) -> FrozenNetworks:
    """Freeze (lesion) or train only (preserve) the chosen networks' neurons of `model`, as `fnscale train` does.

    Call after PEFT wrapping and after choosing what trains (only trainable tensors are snapshotted), before the
    first optimizer step; call `restore()` after each optimizer step and `remove()` when training ends.
    effect "update" (default): the forward pass stays whole, masked slices get zero gradient and are restored after
    each step. "forward": masked neurons' activations are zeroed during training as well.
    control "random": as many neurons per layer as the chosen networks, drawn with `seed` (the size-matched control).
    layers: restrict the masks to these layers (a list or a spec such as "0-7,12"); kernel and offload: see
    `apply_masks` and `protect_masked_weights`.
    """
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if effect not in EFFECTS:
        raise UsageError(f"unknown effect {effect!r}; use one of {', '.join(EFFECTS)}")
    if control not in CONTROLS:
        raise UsageError(f"unknown control {control!r}; use None or 'random'")
    templates = as_templates(networks)
    ids = _component_ids(components)
    mlps = find_mlp_layers(model)
    site = templates.site
    width = mlps[0].width if site == "intermediate" else mlps[0].hidden
    templates.check_compatible(len(mlps), width, site)
    neurons = templates.component_neurons(ids)
    if control == "random":
        neurons = random_like(neurons, width, seed)
    chosen = parse_layers(layers, len(mlps)) if isinstance(layers, str) else (None if layers is None else list(layers))
    masks = build_masks(neurons, mode, len(mlps), width, layers=chosen)

    slices = masked_slices(model, masks, site, offload=offload)  # refuses ZeRO-3 partitions, DoRA, PiSSA-like inits
    guard = MaskedWeightGuard(slices)  # snapshots now; zeroes LoRA slices
    hold = GradientHold(slices) if effect == "update" else None
    masker = Masker(masks, site, kernel, None, guard, zero3=False, decay_free=set(), hold=hold)
    masker.attach(model)  # forward masks: hooks on the down projections (update masks: nothing to attach)
    return FrozenNetworks(masker, ids, mode, effect, control)


def _component_ids(components: int | Iterable[int] | str) -> list[int]:
    """3, [0, 3] or "0,3" -> a list of ids."""
    if isinstance(components, str):
        return parse_component_ids(components)
    if isinstance(components, (int, np.integer)):
        return [int(components)]
    return [int(c) for c in components]
