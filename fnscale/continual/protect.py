"""Protect-as-you-go: a growing set of frozen MLP neurons, one networks file handed to each later stage.

After stage t, functional networks are found on task t's data with the stage-t model (`fnscale templates build`);
their neurons (all components) join the protected set, which stage t+1 trains with as a lesion-update mask
(`--mask-mode lesion --mask-effect update`: the neurons stay in the forward pass, their weights never change).
The set only grows, so a neuron protected after stage t stays bit-identical through every later stage.

Cap: at most `max_share` of each layer's neurons are ever protected (default 0.5). When the new neurons would pass
it, a seeded random subset of them fills the layer up to the cap and the rest stay trainable.

Random control (`mask_control: random`): the arm finds networks on its own stage model in the same way, but instead of
their neurons it protects, per layer, as many new neurons as the networks add to those it found before, drawn at random
(seeded) among the neurons not yet protected: a frozen set of the size the networks would give, placed by chance.
"""

from __future__ import annotations

import numpy as np

from fnscale.networks.templates import Templates


def found_neurons(templates: Templates) -> dict[int, np.ndarray]:
    """The union over every component of a networks file, per layer."""
    out: dict[int, np.ndarray] = {}
    for per_layer in templates.components.values():
        for layer, idx in per_layer.items():
            out[layer] = np.union1d(out.get(layer, np.array([], dtype=np.int64)), idx)
    return out


def grow(
    protected: dict[int, np.ndarray],
    seen: dict[int, np.ndarray],
    found: dict[int, np.ndarray],
    width: int,
    max_share: float,
    seed: int,
    random_control: bool = False,
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """(protected set, networks seen so far) after a stage whose networks are `found`, capped per layer.

    The arm adds the found neurons not yet protected. The random control adds, per layer, as many neurons as the
    found networks add to the union of the networks it found before (`seen`), drawn among its unprotected neurons."""
    rng = np.random.default_rng(seed)
    cap = int(np.floor(max_share * width))
    empty = np.array([], dtype=np.int64)
    grown, seen_after = {}, {}
    for layer in sorted(set(protected) | set(found) | set(seen)):
        old, new_found = protected.get(layer, empty), found.get(layer, empty)
        seen_after[layer] = np.union1d(seen.get(layer, empty), new_found).astype(np.int64)
        room = max(0, cap - old.size)
        if random_control:
            n = min(np.setdiff1d(new_found, seen.get(layer, empty)).size, room)
            new = rng.choice(np.setdiff1d(np.arange(width), old), size=n, replace=False) if n else empty
        else:
            new = np.setdiff1d(new_found, old)
            new = rng.choice(new, size=room, replace=False) if new.size > room else new
        grown[layer] = np.union1d(old, new).astype(np.int64)
    return grown, seen_after


def as_templates(
    protected: dict[int, np.ndarray], seen: dict[int, np.ndarray], like: Templates, note: str
) -> Templates:
    """Component 0: the protected set (what later stages freeze); component 1: the networks found so far (bookkeeping,
    equal to component 0 for the arm itself below the cap), on the layers and site of `like`."""
    return Templates(
        layers=list(like.layers),
        neurons_per_layer=like.neurons_per_layer,
        components={0: protected, 1: seen},
        model=like.model,
        site=like.site,
        scope="global",
        n_components=2,
        percentile=like.percentile,
        kind=like.kind,
        datasets=list(like.datasets),
        num_layers=like.num_layers,
        name=note,
    )


def share(protected: dict[int, np.ndarray], layers: int, width: int) -> float:
    """Frozen share of all MLP neurons."""
    return sum(v.size for v in protected.values()) / max(1, layers * width)
