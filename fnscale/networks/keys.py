"""Key networks (Liu et al. 2025): the components whose lesion at inference raises the loss most.

Each component is lesioned in the forward pass (its neurons zeroed by a forward mask, inference only) and the
mean next-token loss over the data's labelled tokens is measured against the unmasked model. Beside it, the same
is done for `draws` random sets of the same size per layer (seeded per component and draw): the ratio of the two
rises says whether a component matters more than any neurons of its size. Components are ranked by their rise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from fnscale.errors import UsageError
from fnscale.eval.scoring import nll_sum
from fnscale.masking.apply import apply_masks
from fnscale.masking.build import build_masks
from fnscale.models.mlp import find_mlp_layers
from fnscale.networks.controls import random_like
from fnscale.networks.templates import Templates


def mean_loss(model, batches: list[dict], device) -> tuple[float, int]:
    """Mean next-token NLL per labelled token over `batches`, and the number of those tokens."""
    total, count = 0.0, 0
    for batch in batches:
        s, c = nll_sum(model, batch, device)
        total, count = total + s, count + c
    return (total / count if count else float("nan")), count


def lesioned_loss(model, batches: list[dict], neurons: Mapping[int, np.ndarray], site: str, device) -> float:
    """`mean_loss` with `neurons` zeroed in the forward pass; the model is restored afterwards."""
    layers = find_mlp_layers(model)
    width = layers[0].width if site == "intermediate" else layers[0].hidden
    masks = build_masks(neurons, "lesion", len(layers), width)
    with apply_masks(model, masks, site=site, compact=False):
        return mean_loss(model, batches, device)[0]


def draw_seed(seed: int, component: int, draw: int) -> int:
    """An independent seed for each (component, draw) of a ranking seeded with `seed`."""
    return int(np.random.SeedSequence([seed, component, draw]).generate_state(1)[0])


@torch.no_grad()
def rank_components(
    model,
    batches: list[dict],
    templates: Templates,
    ids: Iterable[int],
    *,
    draws: int = 3,
    seed: int = 0,
    device=None,
    progress: bool = True,
) -> dict:
    """The `ranking` a networks file records: base loss, and per component (most harmful lesion first) its neurons,
    lesioned loss, rise, the mean (and sd) rise of `draws` size-matched random lesions, and their ratio (None when
    the random rise is not positive)."""
    if draws < 1:
        raise UsageError(f"--random-draws {draws} must be at least 1")
    was_training = model.training
    model.eval()
    try:
        base, tokens = mean_loss(model, batches, device)
        rows = []
        for c in tqdm(list(ids), desc="lesioning components", disable=not progress, leave=False):
            neurons = templates.component_neurons([c])
            rise = lesioned_loss(model, batches, neurons, templates.site, device) - base
            randoms = [
                lesioned_loss(
                    model,
                    batches,
                    random_like(neurons, templates.neurons_per_layer, draw_seed(seed, c, r)),
                    templates.site,
                    device,
                )
                - base
                for r in range(draws)
            ]
            random_rise = float(np.mean(randoms))
            rows.append(
                {
                    "id": int(c),
                    "neurons": int(sum(v.size for v in neurons.values())),
                    "loss": base + rise,
                    "rise": rise,
                    "random_rise": random_rise,
                    "random_rise_sd": float(np.std(randoms, ddof=1)) if draws > 1 else None,
                    "ratio": rise / random_rise if random_rise > 0 else None,
                }
            )
    finally:
        model.train(was_training)
    rows.sort(key=lambda r: -r["rise"])  # stable: equal rises keep id order
    return {"base_loss": base, "tokens": tokens, "random_draws": draws, "seed": seed, "components": rows}
