"""The template-building recipe: shard samples over ranks, stream 1-3 passes of activations,
merge statistics and PCA states across ranks, FastICA once, threshold, and return templates.

Every rank runs the same number of forward passes (a rank that runs out does a throw-away
forward), so ZeRO-3's collective parameter gathers never hang.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch

from fnscale.errors import UsageError
from fnscale.networks.capture import ActivationCapture
from fnscale.networks.decompose import StreamingDecomposer
from fnscale.networks.stats import torch_all_gather
from fnscale.networks.templates import Templates

log = logging.getLogger(__name__)


def _broadcast(obj, accelerator):
    """The main process's object on every rank."""
    if accelerator is None or accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _batches(samples: Sequence[list[int]], batch_size: int, pad_id: int, device):
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
            attn[j, : len(s)] = 1
        yield ids.to(device), attn.to(device)


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
    cache_budget_gb: float = 0.0,
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
    with ActivationCapture(model, site, layers) as cap:
        # Column slices (views, no copy) of each decomposition's neurons: all layers, or one layer each.
        groups = [slice(None)] if scope == "global" else [slice(i * cap.width, (i + 1) * cap.width) for i in range(len(cap.layers))]
        decs = [StreamingDecomposer(n_components, percentile=percentile, kind=kind, backend=backend, seed=seed) for _ in groups]
        cache: list[np.ndarray] | None = [] if cache_budget_gb > 0 else None
        cache_bytes, budget = 0, cache_budget_gb * 2**30

        def stream(desc: str):
            """One pass over this rank's batches: cached activations when complete, else fresh forwards."""
            nonlocal cache, cache_bytes
            if cache is not None and len(cache) == n_steps:
                yield from (c.astype(np.float32) if c is not None else None for c in cache)
                return
            it = _batches(mine, batch_size, pad_id, device)
            from tqdm.auto import tqdm

            for _ in tqdm(range(n_steps), desc=desc, disable=not (progress and rank == 0), leave=False):
                b = next(it, None)
                if b is None:
                    cap.dummy(device)
                    acts = None
                else:
                    acts = cap.run(*b)
                if cache is not None:
                    cache_bytes += 0 if acts is None else acts.size * 2
                    if cache_bytes > budget:
                        log.info("activation cache over its %.2f GB budget; recomputing passes instead", cache_budget_gb)
                        cache = None
                    else:
                        cache.append(None if acts is None else acts.astype(np.float16))
                yield acts

        def feed(desc: str, update) -> None:
            """One pass: every rank-local batch to every decomposition, as update(index, decomposer, columns)."""
            for acts in stream(desc):
                if acts is not None and len(acts):
                    for i, (dec, cols) in enumerate(zip(decs, groups)):
                        update(i, dec, acts[:, cols])

        if decs[0].standardize:
            feed("capture: statistics", lambda i, dec, x: dec.update_stats(x))
            for dec in decs:
                dec.merge_stats()
            if decs[0].stats_.count_ == 0:
                raise UsageError("no tokens captured: every sample was empty after padding removal")
        feed("capture: PCA", lambda i, dec, x: dec.update_pca(x))
        for dec in decs:
            dec.merge_pca()
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
            result = Templates(layers=captured, neurons_per_layer=width, components=comps, loadings=loads, **meta)
    return _broadcast(result, accelerator)


def tokenize_samples(tokenizer, sources: Sequence, samples_per_dataset: int, max_len: int, seed: int = 0, opts=None) -> tuple[list[list[int]], dict[str, int]]:
    """Up to N examples from each data source (a seeded choice), rendered like training prompts + responses."""
    from fnscale import data

    ids, tokens, _ = data.sample_token_ids(tokenizer, sources, samples_per_dataset, max_len, seed, opts)
    return ids, tokens


def run_build(model_name: str | None, sources: Sequence[str], output: str, *, samples_per_dataset: int = 100, n_components: int = 10,
              percentile: float = 98.0, site: str = "intermediate", layers_spec: str | None = None, scope: str = "global",
              kind: str = "temporal", backend: str = "auto", max_seq_length: int = 512, batch_size: int = 8, dtype: str = "auto",
              seed: int = 0, cache_budget_gb: float = 0.0, gguf_file: str | None = None, trust_remote_code: bool = False) -> dict:
    """`fnscale templates build`: load, capture (sharded under accelerate launch), decompose, save atomically."""
    from pathlib import Path

    from fnscale import data, models
    from fnscale.distributed import make_accelerator
    from fnscale.networks.capture import parse_layers

    if not 0 < percentile < 100:
        raise UsageError(f"--percentile {percentile} must be between 0 and 100 (exclusive)")
    accelerator = make_accelerator()
    with accelerator.main_process_first():
        source = models.resolve_model(model_name, gguf_file)
    tokenizer = models.load_tokenizer(source, trust_remote_code)
    model = models.load_model(source, models.resolve_dtype(dtype, accelerator.device), None, trust_remote_code)
    model = accelerator.prepare_model(model, evaluation_mode=True)
    from fnscale.masking import find_mlp_layers

    num_layers = len(find_mlp_layers(accelerator.unwrap_model(model)))
    layers = parse_layers(layers_spec, num_layers)
    samples, counts = tokenize_samples(tokenizer, list(sources) or [data.DEFAULT_DATASET], samples_per_dataset, max_seq_length, seed)
    templates = build_templates(
        model, samples, n_components=n_components, percentile=percentile, site=site, layers=layers, scope=scope, kind=kind,
        backend=backend, batch_size=batch_size, pad_id=tokenizer.pad_token_id, seed=seed, cache_budget_gb=cache_budget_gb,
        accelerator=accelerator, model_name=source.display_name, datasets=list(sources) or ["default"], token_counts=counts,
    )
    out = Path(output)
    paths = {}
    if accelerator.is_main_process:
        paths["path"] = str(templates.save(out / "global_templates.json"))
        from fnscale.atomic import write_text

        write_text(out / "coverage.txt", templates.coverage_table() + "\n")
        paths["coverage"] = str(out / "coverage.txt")
        paths["heatmap"] = str(templates.save_heatmap(out / "coverage.png"))
    accelerator.wait_for_everyone()
    return {"templates": templates, **paths}
