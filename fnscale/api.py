"""The public Python API: find functional networks, freeze them in any training loop (see docs/api.md).

    import fnscale
    nets = fnscale.load_networks("networks/global_templates.json")     # or fnscale.build_networks(model, tok, data)
    frozen = fnscale.freeze_networks(model, nets, components=[0, 1, 2], mode="lesion")
    ...                                   # any training loop: frozen.restore() after each optimizer step
    frozen.remove()

This module sits at the entry layer, beside the CLI: `build_networks` runs the template-building recipe
(`fnscale.recipes.build_networks`, the code behind `fnscale templates build`), and core modules must not import
recipes. `fnscale/__init__.py` forwards these names lazily, so `import fnscale` does not import torch.
"""

from __future__ import annotations

import os

from fnscale import data
from fnscale.masking.freeze import FrozenNetworks, as_templates, freeze_networks
from fnscale.models.mlp import find_mlp_layers
from fnscale.networks.templates import Templates
from fnscale.preflight import parse_layers
from fnscale.recipes.build_networks import build_templates, tokenize_samples

__all__ = ["FrozenNetworks", "Templates", "build_networks", "freeze_networks", "load_networks"]


def load_networks(path: str | os.PathLike) -> Templates:
    """Read a networks file: fnscale's `global_templates.json` or FunctionalNetworksSFT's."""
    return as_templates(path)


def build_networks(
    model,
    tokenizer,
    data_sources=None,
    *,
    components: int = 10,
    percentile: float = 98.0,
    site: str = "intermediate",
    layers: list[int] | str | None = None,
    scope: str = "global",
    kind: str = "temporal",
    samples_per_dataset: int = 100,
    max_seq_length: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    output: str | os.PathLike | None = None,
    progress: bool = True,
    accelerator=None,
) -> Templates:
    """Functional networks of `model` (ICA over its MLP neurons), as `fnscale templates build` finds them.

    data_sources: what `--dataset` takes (a data file, a hub dataset id, a `DatasetSpec`, a list of them; None:
    the bundled sample data); up to `samples_per_dataset` examples of each are rendered like training prompts.
    output: a folder for global_templates.json, coverage.txt and coverage.png. Under `accelerate launch`, pass the
    `accelerator` to shard the capture over the ranks (every rank gets the same templates).
    """
    mlps = len(find_mlp_layers(model))
    chosen = sorted({int(x) for x in layers}) if isinstance(layers, (list, tuple, set)) else parse_layers(layers, mlps)
    samples, counts = tokenize_samples(tokenizer, data_sources, samples_per_dataset, max_seq_length, seed)
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    sources = data_sources if isinstance(data_sources, (list, tuple)) else [data_sources or data.DEFAULT_DATASET]
    training = model.training
    templates = build_templates(
        model,
        samples,
        n_components=components,
        percentile=percentile,
        site=site,
        layers=chosen,
        scope=scope,
        kind=kind,
        batch_size=batch_size,
        pad_id=tokenizer.pad_token_id or 0,
        seed=seed,
        accelerator=accelerator,
        progress=progress,
        model_name=name,
        datasets=[str(s) for s in sources],
        token_counts=counts,
    )
    model.train(training)  # the capture ran in eval mode
    if output is not None and (accelerator is None or accelerator.is_main_process):
        templates.save_folder(output)
    return templates
