"""The `templates select` and `templates rank` recipes: load the model the networks belong to and the data, score
neurons or components (fnscale.networks.selectors / keys), write a networks file.

One process, one device. The model defaults to the one the networks file names (the embedded SmolLM2 when it
names that or none); it must match the file's layers and width.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fnscale import data
from fnscale.config import NetworkDataConfig, TemplatesRankConfig, TemplatesSelectConfig
from fnscale.errors import UsageError
from fnscale.models import loading
from fnscale.models.paths import DEFAULT_NAME
from fnscale.networks import keys, selectors
from fnscale.networks.templates import Templates
from fnscale.preflight import parse_component_ids

log = logging.getLogger(__name__)

SCORES = {  # what a selection file says its score was
    "activation": "mean |activation| over the data's non-padding tokens",
    "fisher": (
        "mean over examples of (dL_e/dg)^2, L_e the example's summed NLL over its labelled tokens, "
        "g a per-neuron gate of ones"
    ),
}


@dataclass
class Scoring:
    """What scoring needs: the model on its device, the data's collated batches, and what to record about them."""

    model: object
    device: object
    batches: list[dict]
    model_name: str
    datasets: list[str]
    tokens: dict[str, int]
    examples: dict[str, int]


def model_for(requested: str | None, templates: Templates) -> str | None:
    """--model, else the model the networks file names (None: the embedded default)."""
    if requested:
        return requested
    named = templates.model
    if named in (None, DEFAULT_NAME, "default"):
        return None
    if not Path(named).expanduser().exists() and "/" not in named:
        raise UsageError(
            f"the networks file names model {named!r}, which is neither a folder here nor a hub id; "
            "pass the model it was built on with --model"
        )
    return named


def prepare(cfg: NetworkDataConfig, templates: Templates) -> Scoring:
    """Load the model (checked against the networks file) and draw the data as `templates build` does."""
    from fnscale.models.mlp import find_mlp_layers

    if cfg.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    device = loading.pick_device(cfg.device)
    chosen = model_for(cfg.model, templates)
    source = loading.resolve_model(chosen, cfg.gguf_file)
    tokenizer = loading.load_tokenizer(source, cfg.trust_remote_code)
    model = loading.load_model(source, loading.resolve_dtype(cfg.dtype, device), None, cfg.trust_remote_code).to(device)
    layers = find_mlp_layers(model)
    templates.check_compatible(
        len(layers), layers[0].width if templates.site == "intermediate" else layers[0].hidden, templates.site
    )
    sources = list(cfg.data) or [data.DEFAULT_DATASET]
    opts = data.DataOptions(
        schema=cfg.schema, template=cfg.template, prompt_column=cfg.prompt_column, response_column=cfg.response_column
    )
    items, tokens, examples = data.sample_items(
        tokenizer, sources, cfg.samples_per_dataset, cfg.max_seq_length, cfg.seed, opts
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [data.collate(items[i : i + cfg.batch_size], pad) for i in range(0, len(items), cfg.batch_size)]
    name = (
        source.display_name if chosen is None or cfg.gguf_file else chosen
    )  # as given, so a later --model default finds it
    return Scoring(model, device, batches, name, list(cfg.data) or ["default"], tokens, examples)


def run_select(cfg: TemplatesSelectConfig) -> dict:
    """`fnscale templates select`: as many neurons per layer as --like's chosen components, by --by; saved to
    --output."""
    if not cfg.by or not cfg.like or not cfg.output:
        raise UsageError(
            "templates select needs --by activation|fisher|random, --like NETWORKS.json and --output FILE.json"
        )
    like = Templates.load(cfg.like)
    ids = None if cfg.ica_component_ids is None else parse_component_ids(cfg.ica_component_ids, like)
    counts = selectors.layer_counts(like, ids, cfg.share)
    how = {
        "by": cfg.by,
        "like": str(cfg.like),
        "components": ids,
        "share": cfg.share,
        "counts": {str(layer): n for layer, n in counts.items()},
        "seed": cfg.seed,
    }
    if cfg.by == "random":
        chosen = selectors.random_neurons(counts, like.neurons_per_layer, cfg.seed)
        result = selectors.selection_templates(like, chosen, how)
    else:
        s = prepare(cfg, like)
        score = selectors.activation_scores if cfg.by == "activation" else selectors.fisher_scores
        log.info(
            "scoring %d neurons per layer by %s on %d examples",
            like.neurons_per_layer,
            cfg.by,
            sum(s.examples.values()),
        )
        scores = score(s.model, s.batches, like.site, sorted(counts), s.device)
        how.update(
            {
                "data": s.datasets,
                "examples": s.examples,
                "tokens": s.tokens,
                "samples_per_dataset": cfg.samples_per_dataset,
                "max_seq_length": cfg.max_seq_length,
                "score": SCORES[cfg.by],
            }
        )
        result = selectors.selection_templates(
            like,
            selectors.top_neurons(scores, counts),
            how,
            model=s.model_name,
            datasets=s.datasets,
            token_counts=s.tokens,
        )
    return {"templates": result, "path": str(result.save(cfg.output))}


def run_rank(path: str, cfg: TemplatesRankConfig) -> dict:
    """`fnscale templates rank`: lesion each component on the data, record the ranking in the file (or --output)."""
    templates = Templates.load(path)
    if templates.source_format != "fnscale" and not cfg.output:
        raise UsageError(
            f"{path} is a {templates.source_format} file; rank writes an fnscale networks file, so pass --output "
            "FILE.json"
        )
    ids = (
        templates.component_ids
        if cfg.ica_component_ids is None
        else parse_component_ids(cfg.ica_component_ids, templates)
    )
    templates.component_neurons(ids)  # refuses ids the file does not have
    if cfg.random_draws < 1:
        raise UsageError(f"--random-draws {cfg.random_draws} must be at least 1")
    s = prepare(cfg, templates)
    ranking = keys.rank_components(
        s.model, s.batches, templates, ids, draws=cfg.random_draws, seed=cfg.seed, device=s.device
    )
    templates.ranking = {
        "model": s.model_name,
        "data": s.datasets,
        "examples": s.examples,
        "samples_per_dataset": cfg.samples_per_dataset,
        "max_seq_length": cfg.max_seq_length,
        **ranking,
    }
    return {"templates": templates, "path": str(templates.save(cfg.output or path))}
