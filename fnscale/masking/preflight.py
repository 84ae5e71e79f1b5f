"""Mask options checked before any weights load: a mistake costs seconds, not a model load.

`check_mask_options` needs no model (ids given, template file readable, ids and --ica-layers within the
template); `check_template_fits_config` reads only the model's config.json (AutoConfig, no weights) and
compares the template's layer count and width with it. Each refusal is one UsageError line.
"""

from __future__ import annotations

import logging

from fnscale.errors import UsageError
from fnscale.masking.setup import parse_component_ids
from fnscale.networks.capture import parse_layers
from fnscale.networks.templates import Templates

log = logging.getLogger(__name__)


def check_mask_options(cfg) -> Templates | None:
    """The template a masked run will use, validated against the options; None when masks are off or computed."""
    if cfg.mask_mode == "none":
        return None
    ids = parse_component_ids(cfg.ica_component_ids)
    if not cfg.ica_template_path:
        return None  # templates are computed on the training data: ids and layers are checked once they exist
    templates = Templates.load(cfg.ica_template_path)
    templates.component_neurons(ids)  # refuses ids the template does not have
    if cfg.ica_layers:
        top = templates.num_layers or max(templates.layers) + 1
        chosen = parse_layers(cfg.ica_layers, top)
        outside = sorted(set(chosen) - set(templates.layers))
        if outside:
            raise UsageError(f"--ica-layers {cfg.ica_layers} names layers {outside} that the template does not cover (it has {templates.layers})")
    return templates


def check_template_fits_config(templates: Templates, model_path: str, trust_remote_code: bool = False) -> None:
    """Layer count and width from config.json alone; a config that cannot be read is left to the model load."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception as err:  # offline hub id, custom code: the model load reports it properly
        log.debug("model config not read before loading (%s); the template is checked after the load", type(err).__name__)
        return
    config = getattr(config, "text_config", None) or config
    num_layers = getattr(config, "num_hidden_layers", None)
    width = getattr(config, "intermediate_size" if templates.site == "intermediate" else "hidden_size", None)
    if isinstance(num_layers, int) and isinstance(width, int):
        templates.check_compatible(num_layers, width, templates.site)
