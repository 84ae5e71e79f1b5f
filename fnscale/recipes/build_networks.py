"""The template-building recipe: shard samples over ranks, stream 1-2 passes of activations,
merge statistics and PCA states across ranks, FastICA once, threshold, and return templates.

Every rank runs the same number of forward passes (a rank that runs out does a throw-away
forward), so ZeRO-3's collective parameter gathers never hang.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
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


class _ActivationPasses:
    """This rank's batches, one pass per call: fresh forwards, kept in memory during the first pass when
    `keep` (see `cache`) and replayed from there afterwards; a rank out of batches does throw-away forwards."""

    def __init__(self, cap: ActivationCapture, samples, n_steps: int, batch_size: int, pad_id: int, device, keep: bool, show: bool):
        self.cap, self.samples, self.n_steps, self.batch_size, self.pad_id, self.device = cap, samples, n_steps, batch_size, pad_id, device
        self.show = show
        self.cache: list[tuple[np.ndarray, np.ndarray] | None] | None = [] if keep else None

    def __call__(self, desc: str):
        if self.cache is not None and len(self.cache) == self.n_steps:
            yield from (None if c is None else cache.decode(*c) for c in self.cache)
            return
        it = _batches(self.samples, self.batch_size, self.pad_id, self.device)
        for _ in tqdm(range(self.n_steps), desc=desc, disable=not self.show, leave=False):
            b = next(it, None)
            if b is None:
                self.cap.dummy(self.device)
            acts = None if b is None else self.cap.run(*b)
            if self.cache is not None:
                self.cache.append(None if acts is None else cache.encode(acts))
            yield acts


def _plan_cache(budget, samples, cap: ActivationCapture, passes_after_first: int) -> bool:
    """Cache on every rank or on none (ranks must run the same forwards): each rank plans for its share."""
    fits = cache.plan_cache(budget, sum(len(s) for s in samples), cap.width * len(cap.layers), passes_after_first)
    return all(torch_all_gather(fits))


def _per_layer_templates(results, captured: list[int], width: int, *, percentile: float, kind: str, **meta) -> Templates:
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
    progress: bool = True,
    model_name: str | None = None,
    **meta,
) -> Templates:
    """Functional networks of `model` on tokenised `samples` (lists of token ids), sharded over ranks."""
    if not samples:
        raise UsageError("no samples to build templates from; check the data (zero examples after filtering)")
    if scope not in ("global", "layer"):
        raise UsageError(f"unknown scope {scope!r}; use global or layer")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    mine = list(samples[rank::world])  # strided shard: every sample is processed exactly once overall
    n_steps = math.ceil(math.ceil(len(samples) / world) / batch_size)  # identical on every rank

    model.eval()
    # Stop each forward after the last captured layer, unless ZeRO-3 gathers or offload hooks need it to run to the end.
    stop_early = (accelerator is None or zero_stage(accelerator) != 3) and not getattr(model, "hf_device_map", None)
    with ActivationCapture(model, site, layers, stop_early=stop_early) as cap:
        # Column slices (views, no copy) of each decomposition's neurons: all layers, or one layer each.
        groups = [slice(None)] if scope == "global" else [slice(i * cap.width, (i + 1) * cap.width) for i in range(len(cap.layers))]
        # oversample 20 (not 10): the folded pass truncates under running standardisations, per rank
        decs = [StreamingDecomposer(n_components, percentile=percentile, kind=kind, backend=backend, seed=seed, fold_stats=True, oversample=20)
                for _ in groups]
        keep = _plan_cache(cache_budget_gb, mine, cap, decs[0].n_passes - 1)
        stream = _ActivationPasses(cap, mine, n_steps, batch_size, pad_id, device, keep, progress and rank == 0)

        def feed(desc: str, update) -> None:
            """One pass: every rank-local batch to every decomposition, as update(index, decomposer, columns)."""
            for acts in stream(desc):
                if acts is not None and len(acts):
                    for i, (dec, cols) in enumerate(zip(decs, groups)):
                        update(i, dec, acts[:, cols])

        # Pass 1: exact statistics and the PCA under a running standardisation, together; pass 2: projection.
        feed("capture: statistics + PCA", lambda i, dec, x: dec.update(x))
        for dec in decs:
            dec.merge()
        Zs: list[list[np.ndarray]] = [[] for _ in decs]
        if kind == "temporal":
            feed("capture: projection", lambda i, dec, x: Zs[i].append(dec.project(x)))
        width, captured, num_layers = cap.width, list(cap.layers), cap.num_layers

    # FastICA once, on the main process; everyone gets the same masks.
    gathered = [torch_all_gather(np.concatenate(z) if z else np.zeros((0, n_components))) for z in Zs] if kind == "temporal" else [None] * len(decs)
    result = None
    if rank == 0:
        results = [dec.finish(z) for dec, z in zip(decs, gathered)]
        meta = {"site": site, "scope": scope, "num_layers": num_layers, "model": model_name, **meta}
        if scope == "global":
            result = Templates.from_decomposition(results[0], captured, width, **meta)
        else:
            result = _per_layer_templates(results, captured, width, percentile=percentile, kind=kind, **meta)
    return broadcast_from_main(result, accelerator)


def tokenize_samples(tokenizer, sources: Sequence, samples_per_dataset: int, max_len: int, seed: int = 0, opts=None) -> tuple[list[list[int]], dict[str, int]]:
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
    place = placement(cfg.device_map, cfg.max_memory, cfg.offload_folder)  # --device-map auto: one process, split over devices
    cache.parse_budget(cfg.cache_budget_gb)  # refuse a bad value before loading anything
    check_ddp_timeout(cfg.ddp_timeout)
    accelerator = make_accelerator(timeout_s=cfg.ddp_timeout)
    with accelerator.main_process_first():
        source = loading.resolve_model(cfg.model, cfg.gguf_file)
    tokenizer = loading.load_tokenizer(source, cfg.trust_remote_code)
    model = loading.load_model(source, loading.resolve_dtype(cfg.dtype, accelerator.device), None, cfg.trust_remote_code, placement=place)
    if place is not None:
        log.info("device map: %s", placement_summary(model))
    if place is None and zero_stage(accelerator) != 3:  # ZeRO-3: loaded partitioned, forwards gather (zero3_gathering)
        model = accelerator.prepare_model(model, evaluation_mode=True)
    layers = parse_layers(cfg.layers, len(find_mlp_layers(accelerator.unwrap_model(model))))
    sources = list(cfg.dataset) or [data.DEFAULT_DATASET]
    opts = data.DataOptions(schema=cfg.schema, template=cfg.template, prompt_column=cfg.prompt_column, response_column=cfg.response_column)
    samples, counts = tokenize_samples(tokenizer, sources, cfg.samples_per_dataset, cfg.max_seq_length, cfg.seed, opts)
    with zero3_gathering(model, accelerator):
        templates = build_templates(
            model, samples, n_components=cfg.components, percentile=cfg.percentile, site=cfg.site, layers=layers, scope=cfg.scope,
            kind=cfg.ica_kind, backend=cfg.pca_backend, batch_size=cfg.batch_size, pad_id=tokenizer.pad_token_id, seed=cfg.seed,
            cache_budget_gb=cfg.cache_budget_gb, accelerator=accelerator, model_name=source.display_name,
            datasets=list(cfg.dataset) or ["default"], token_counts=counts,
        )
    paths = templates.save_folder(cfg.output) if accelerator.is_main_process else {}
    accelerator.wait_for_everyone()
    return {"templates": templates, **paths}
