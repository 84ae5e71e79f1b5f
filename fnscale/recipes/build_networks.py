"""The template-building recipe: shard samples over ranks, stream 1-2 passes of activations,
merge statistics and PCA states across ranks, FastICA once, threshold, and return templates.

Every rank runs the same number of forward passes (a rank that runs out does a throw-away
forward), so ZeRO-3's collective parameter gathers never hang.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from fnscale import data
from fnscale.config import TemplatesBuildConfig
from fnscale.errors import UsageError
from fnscale.models import loading
from fnscale.networks import cache
from fnscale.networks.capture import ActivationCapture
from fnscale.networks.decompose import StreamingDecomposer
from fnscale.networks.stats import torch_all_gather
from fnscale.networks.templates import Templates
from fnscale.preflight import check_ddp_timeout, parse_layers
from fnscale.runtime.distributed import broadcast_from_main, zero_stage

log = logging.getLogger(__name__)


def _batches(samples: Sequence[list[int]], batch_size: int, pad_id: int, device):
    """(input_ids, attention_mask) per batch, right-padded as training pads them."""
    for i in range(0, len(samples), batch_size):
        batch = data.collate([{"input_ids": s, "labels": s} for s in samples[i : i + batch_size]], pad_id)
        yield batch["input_ids"].to(device), batch["attention_mask"].to(device)


@dataclass(frozen=True)
class _Shard:
    """This rank's samples (a strided share: every sample is processed exactly once overall) and how to batch them.
    `n_steps` is the same on every rank, so ranks run the same number of forwards."""

    samples: list[list[int]]
    n_steps: int
    batch_size: int
    pad_id: int
    device: torch.device

    @classmethod
    def of(cls, samples: Sequence[list[int]], rank: int, world: int, batch_size: int, pad_id: int, device) -> _Shard:
        n_steps = math.ceil(math.ceil(len(samples) / world) / batch_size)
        return cls(list(samples[rank::world]), n_steps, batch_size, pad_id, torch.device(device))


@dataclass(frozen=True)
class _Part:
    """One decomposition and the columns of the captured activations it reads (all layers, or one layer)."""

    dec: StreamingDecomposer
    cols: slice


def _forwards(cap: ActivationCapture, shard: _Shard, desc: str, show: bool) -> Iterator[torch.Tensor | None]:
    """One pass of fresh forwards: each batch's activations (on the device they were computed on); None for the
    throw-away forward of a rank that is out of batches."""
    batches = _batches(shard.samples, shard.batch_size, shard.pad_id, shard.device)
    for _ in tqdm(range(shard.n_steps), desc=desc, disable=not show, leave=False):
        b = next(batches, None)
        if b is None:
            cap.dummy(shard.device)
        yield None if b is None else cap.run(*b)


def _replay(kept: list, device) -> Iterator[torch.Tensor | None]:
    """The activations the first pass kept (`cache`), decoded on `device`."""
    for c in kept:
        yield None if c is None else cache.decode(*c, device=device)


def _fit_pass(parts: list[_Part], batches: Iterable, keep: bool) -> list | None:
    """Pass 1 (every rank): statistics and PCA of each part, merged across ranks at the end. Returns the batches
    encoded for the cache when `keep` (None otherwise)."""
    kept = [] if keep else None
    for acts in batches:
        if kept is not None:
            kept.append(None if acts is None else cache.encode(acts))
        if acts is not None and len(acts):
            for p in parts:
                p.dec.update(acts[:, p.cols])
    for p in parts:
        p.dec.merge()
    return kept


def _project_pass(parts: list[_Part], batches: Iterable) -> list[np.ndarray]:
    """Pass 2 (temporal ICA): this rank's tokens x k coordinates in each part's top-k principal directions."""
    zs: list[list[np.ndarray]] = [[] for _ in parts]
    for acts in batches:
        if acts is not None and len(acts):
            for z, p in zip(zs, parts):
                z.append(p.dec.project(acts[:, p.cols]))
    return [np.concatenate(z) if z else np.zeros((0, p.dec.n_components)) for z, p in zip(zs, parts)]


def _plan_cache(budget, samples, cap: ActivationCapture, passes_after_first: int) -> bool:
    """Cache on every rank or on none (ranks must run the same forwards): each rank plans for its share."""
    fits = cache.plan_cache(budget, sum(len(s) for s in samples), cap.width * len(cap.layers), passes_after_first)
    return all(torch_all_gather(fits))


def _input_device(model, accelerator) -> torch.device:
    """Where the model takes its inputs: its input embeddings' device (for a model split over devices, the first
    one), wherever the accelerator is (a model may not be placed yet). Under ZeRO-3 (partitioned placeholders) and
    for offloaded embeddings (on `meta`; accelerate's hooks move inputs), the accelerator's device."""
    if accelerator is not None and zero_stage(accelerator) == 3:
        return accelerator.device
    try:
        weight = model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):  # e.g. a DDP wrapper, or a model without input embeddings
        weight = next(model.parameters(), None)
    if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
        return accelerator.device if accelerator is not None else torch.device("cpu")
    return weight.device


def _per_layer_templates(
    results, captured: list[int], width: int, *, percentile: float, kind: str, **meta
) -> Templates:
    """scope=layer: one decomposition per layer; its components are numbered on after the previous layer's."""
    comps, loads, total = {}, {}, 0
    for layer, res in zip(captured, results):
        for c, mask in enumerate(res.masks):
            cid = len(comps)
            comps[cid] = {layer: np.flatnonzero(mask)}
            loads[cid] = {layer: res.mixing[mask, c]}
        total = res.n_tokens
    meta.setdefault("percentile", percentile)
    meta.setdefault("kind", kind)
    meta.setdefault("token_counts", {"total": int(total)})
    return Templates(layers=captured, neurons_per_layer=width, components=comps, loadings=loads, **meta)


def build_templates(
    model,
    samples: Sequence[list[int]],
    *,
    n_components: int,
    percentile: float = 98.0,
    site: str = "intermediate",
    layers: list[int] | None = None,
    scope: str = "global",
    kind: str = "temporal",
    backend: str = "auto",
    batch_size: int = 8,
    pad_id: int = 0,
    seed: int = 0,
    cache_budget_gb: float | str = "auto",
    accelerator=None,
    device=None,
    progress: bool = True,
    model_name: str | None = None,
    **meta,
) -> Templates:
    """Functional networks of `model` on tokenised `samples` (lists of token ids), sharded over ranks.

    `device`: where capture batches go (default: the device of the model's input embeddings, see `_input_device`).
    Activations stay on the device they are computed on through the statistics and, with the torch or cuML
    backend, the PCA, which runs on that device too.
    """
    if not samples:
        raise UsageError("no samples to build templates from; check the data (zero examples after filtering)")
    if scope not in ("global", "layer"):
        raise UsageError(f"unknown scope {scope!r}; use global or layer")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    device = torch.device(device) if device is not None else _input_device(model, accelerator)
    shard = _Shard.of(samples, rank, world, batch_size, pad_id, device)
    show = progress and rank == 0

    model.eval()
    # Stop each forward after the last captured layer, unless ZeRO-3 gathers or offload hooks need it to run to the end.
    stop_early = (accelerator is None or zero_stage(accelerator) != 3) and not getattr(model, "hf_device_map", None)
    with ActivationCapture(model, site, layers, stop_early=stop_early) as cap:
        w = cap.width
        columns = [slice(None)] if scope == "global" else [slice(i * w, (i + 1) * w) for i in range(len(cap.layers))]
        # oversample 20 (not 10): the folded pass truncates under running standardisations, per rank
        opts = dict(
            percentile=percentile, kind=kind, backend=backend, seed=seed, fold_stats=True, oversample=20, device=device
        )
        parts = [_Part(StreamingDecomposer(n_components, **opts), cols) for cols in columns]
        keep = _plan_cache(cache_budget_gb, shard.samples, cap, parts[0].dec.n_passes - 1)
        # Pass 1: exact statistics and the PCA under a running standardisation, together; pass 2: projection.
        kept = _fit_pass(parts, _forwards(cap, shard, "capture: statistics + PCA", show), keep)
        zs = None
        if kind == "temporal":
            again = _replay(kept, device) if kept is not None else _forwards(cap, shard, "capture: projection", show)
            zs = _project_pass(parts, again)
        captured, num_layers = list(cap.layers), cap.num_layers

    # FastICA once, on the main process; everyone gets the same masks.
    gathered = [torch_all_gather(z) for z in zs] if zs is not None else [None] * len(parts)
    result = None
    if rank == 0:
        results = [p.dec.finish(z) for p, z in zip(parts, gathered)]
        meta = {"site": site, "scope": scope, "num_layers": num_layers, "model": model_name, **meta}
        if scope == "global":
            result = Templates.from_decomposition(results[0], captured, w, **meta)
        else:
            result = _per_layer_templates(results, captured, w, percentile=percentile, kind=kind, **meta)
    return broadcast_from_main(result, accelerator)


def tokenize_samples(
    tokenizer, sources: Sequence, samples_per_dataset: int, max_len: int, seed: int = 0, opts=None
) -> tuple[list[list[int]], dict[str, int]]:
    """Up to N examples from each data source (a seeded choice), rendered like training prompts + responses."""
    ids, tokens, _ = data.sample_token_ids(tokenizer, sources, samples_per_dataset, max_len, seed, opts)
    return ids, tokens


def run_build(cfg: TemplatesBuildConfig) -> dict:
    """`fnscale templates build`: load, capture (sharded under accelerate launch), decompose, save atomically."""
    from fnscale.models.mlp import find_mlp_layers
    from fnscale.models.placement import placement
    from fnscale.models.placement import summary as placement_summary
    from fnscale.runtime.distributed import make_accelerator, zero3_gathering

    if not 0 < cfg.percentile < 100:
        raise UsageError(f"--percentile {cfg.percentile} must be between 0 and 100 (exclusive)")
    place = placement(
        cfg.device_map, cfg.max_memory, cfg.offload_folder
    )  # --device-map auto: one process, split over devices
    cache.parse_budget(cfg.cache_budget_gb)  # refuse a bad value before loading anything
    check_ddp_timeout(cfg.ddp_timeout)
    accelerator = make_accelerator(timeout_s=cfg.ddp_timeout)
    with accelerator.main_process_first():
        source = loading.resolve_model(cfg.model, cfg.gguf_file)
    tokenizer = loading.load_tokenizer(source, cfg.trust_remote_code)
    model = loading.load_model(
        source, loading.resolve_dtype(cfg.dtype, accelerator.device), None, cfg.trust_remote_code, placement=place
    )
    if place is not None:
        log.info("device map: %s", placement_summary(model))
    if place is None and zero_stage(accelerator) != 3:  # ZeRO-3: loaded partitioned, forwards gather (zero3_gathering)
        model = accelerator.prepare_model(model, evaluation_mode=True)
    layers = parse_layers(cfg.layers, len(find_mlp_layers(accelerator.unwrap_model(model))))
    sources = list(cfg.dataset) or [data.DEFAULT_DATASET]
    opts = data.DataOptions(
        schema=cfg.schema, template=cfg.template, prompt_column=cfg.prompt_column, response_column=cfg.response_column
    )
    samples, counts = tokenize_samples(tokenizer, sources, cfg.samples_per_dataset, cfg.max_seq_length, cfg.seed, opts)
    with zero3_gathering(model, accelerator):
        templates = build_templates(
            model,
            samples,
            n_components=cfg.components,
            percentile=cfg.percentile,
            site=cfg.site,
            layers=layers,
            scope=cfg.scope,
            kind=cfg.ica_kind,
            backend=cfg.pca_backend,
            batch_size=cfg.batch_size,
            pad_id=tokenizer.pad_token_id,
            seed=cfg.seed,
            cache_budget_gb=cfg.cache_budget_gb,
            accelerator=accelerator,
            model_name=source.display_name,
            datasets=list(cfg.dataset) or ["default"],
            token_counts=counts,
        )
    paths = templates.save_folder(cfg.output) if accelerator.is_main_process else {}
    accelerator.wait_for_everyone()
    return {"templates": templates, **paths}
