"""Building masks from selected neurons (`build_masks`), and checking masks against a model (`check_masks`).

A mask is a float vector per decoder layer, 1 = keep, spanning the MLP's intermediate neurons (site
"intermediate") or the hidden-size channels of the MLP output (site "mlp_output").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from fnscale.errors import UsageError
from fnscale.models.mlp import MLPLayer

MODES = ("lesion", "preserve")


def _neuron_ids(neurons, layer: int, width: int) -> torch.Tensor:
    arr = np.asarray(sorted(neurons) if isinstance(neurons, (set, frozenset)) else neurons).reshape(-1)
    if arr.size == 0:
        return torch.empty(0, dtype=torch.long)
    if arr.dtype.kind == "f" and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise UsageError(f"layer {layer}: neuron ids must be integers, got {arr.dtype} values")
    if arr.min() < 0 or arr.max() >= width:
        bad = int(arr.min() if arr.min() < 0 else arr.max())
        raise UsageError(
            f"layer {layer}: neuron {bad} is outside 0..{width - 1}; the template was built for another model"
        )
    return torch.as_tensor(arr.astype(np.int64))


def build_masks(
    neurons_by_layer: Mapping[int, Iterable[int]],
    mode: str,
    num_layers: int,
    width: int,
    layers: Iterable[int] | None = None,
) -> dict[int, torch.Tensor]:
    """Float masks (1 = keep) per layer from the selected neurons of each layer.

    lesion: 0 on the selected neurons, 1 elsewhere. preserve: 1 on the selected neurons, 0 elsewhere;
    a layer without any selected neuron is left unmasked (as the reference implementation does: zeroing
    a whole MLP would make preserve a layer-ablation). Only layers in `layers` (default all) are masked.
    Layers whose mask keeps everything are omitted, so the result holds only masks that do something.
    Refuses (UsageError) a mask that changes nothing or removes every neuron of every layer.
    """
    if mode not in MODES:
        raise UsageError(f"unknown mask mode {mode!r}; use one of {', '.join(MODES)}")
    chosen = set(range(num_layers)) if layers is None else {int(x) for x in layers}
    outside = sorted(x for x in chosen if not 0 <= x < num_layers)
    if outside:
        raise UsageError(f"layer {outside[0]} does not exist; the model has layers 0..{num_layers - 1}")
    masks = {}
    for key, neurons in neurons_by_layer.items():
        layer = int(key)
        if not 0 <= layer < num_layers:
            raise UsageError(
                f"the neurons name layer {layer} but the model has layers 0..{num_layers - 1}; "
                "the template was built for another model"
            )
        ids = _neuron_ids(neurons, layer, width)
        if layer not in chosen or ids.numel() == 0:
            continue
        if mode == "lesion":
            mask = torch.ones(width).index_fill_(0, ids, 0.0)
        else:
            mask = torch.zeros(width).index_fill_(0, ids, 1.0)
        if not bool((mask == 1).all()):
            masks[layer] = mask
    if not masks:
        raise UsageError(
            f"the {mode} mask changes nothing (no selected neuron is removed in the chosen layers); "
            "choose other components or layers"
        )
    if len(masks) == num_layers and all(not bool(m.any()) for m in masks.values()):
        raise UsageError("the lesion mask removes every MLP neuron of every layer; select fewer components")
    return masks


def check_masks(masks: Mapping[int, torch.Tensor], layers: list[MLPLayer], site: str) -> dict[int, torch.Tensor]:
    checked = {}
    for key, mask in masks.items():
        layer = int(key)
        if not 0 <= layer < len(layers):
            raise UsageError(f"a mask names layer {layer} but the model has layers 0..{len(layers) - 1}")
        mask = torch.as_tensor(mask).detach().to("cpu", torch.float32).reshape(-1)
        size = layers[layer].width if site == "intermediate" else layers[layer].hidden
        if mask.numel() != size:
            what = "MLP neurons" if site == "intermediate" else "hidden channels"
            raise UsageError(
                f"the mask for layer {layer} has {mask.numel()} entries but the model has {size} {what} there; "
                "the masks were built for another model or capture site"
            )
        checked[layer] = mask
    return checked
