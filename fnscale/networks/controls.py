"""Random controls: as many neurons per layer as the chosen networks, drawn at random from the same site.

Every claim that ICA networks are the right neurons needs this baseline: a mask of the same size per layer,
placed by chance. `random_like` draws it for a set of chosen neurons (`train --mask-control random`),
`random_templates` for every component of a template (`templates random --like T.json`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from fnscale.networks.templates import Templates


def random_like(neurons_by_layer: Mapping[int, np.ndarray], width: int, seed: int) -> dict[int, np.ndarray]:
    """Per layer, `len(neurons)` distinct neurons of 0..width-1 drawn uniformly (seeded, layer by layer in order)."""
    return _draw(np.random.default_rng(seed), neurons_by_layer, width)


def _draw(rng: np.random.Generator, neurons_by_layer: Mapping[int, np.ndarray], width: int) -> dict[int, np.ndarray]:
    return {
        layer: np.sort(rng.choice(width, size=len(neurons), replace=False))
        for layer, neurons in sorted(neurons_by_layer.items())
    }


def random_templates(like: Templates, seed: int) -> Templates:
    """`like` with each component's neurons replaced by a size-matched random draw per layer; the metadata says it is a
    control."""
    rng = np.random.default_rng(seed)
    components = {c: _draw(rng, by_layer, like.neurons_per_layer) for c, by_layer in sorted(like.components.items())}
    name = f"random control of {like.name or like.model or 'templates'} (seed {seed})"
    return dataclasses.replace(
        like,
        components=components,
        loadings=None,
        name=name,
        control={"kind": "random", "seed": int(seed)},
        selection=None,
        ranking=None,
    )  # like's ranking measured like's neurons, not these
