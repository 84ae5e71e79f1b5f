"""Checks that need no model, run before torch is even imported: a mistake costs a second, not a model load.

`check_mask_options` needs no model (ids given, template file readable, ids and --ica-layers within the
template); `check_template_fits_config` reads only the model's config.json (no weights) and compares the
template's layer count and width with it; output paths must be writable places, and a hub model must be cached
or reachable. Each refusal is one UsageError line. No torch import here.
"""

from __future__ import annotations

import json
from pathlib import Path

from fnscale.errors import UsageError
from fnscale.models.paths import check_hub_model, local_config_folder
from fnscale.networks.templates import Templates


def parse_component_ids(spec: str | None, templates: Templates | None = None) -> list[int]:
    """`0,3` or the reference's `[0, 3]` -> [0, 3]; `top:K` -> the K most important components of a ranked `templates`
    (`fnscale templates rank`), most important first."""
    if spec is None or not str(spec).strip("[] "):
        raise UsageError("--mask-mode needs --ica-component-ids, e.g. 0,3")
    text = str(spec).strip()
    if text.lower().startswith("top:"):
        return _top_ids(text, templates)
    try:
        ids = [int(p) for p in text.strip("[] ").split(",") if p.strip()]
    except ValueError:
        raise UsageError(
            f"bad --ica-component-ids {spec!r}; use comma-separated integers, e.g. 0,3, or top:K"
        ) from None
    if any(i < 0 for i in ids):
        raise UsageError(f"component ids must be >= 0, got {spec!r}")
    return ids


def _top_ids(spec: str, templates: Templates | None) -> list[int]:
    try:
        k = int(spec[4:])
    except ValueError:
        raise UsageError(f"bad --ica-component-ids {spec!r}; top:K takes a whole number, e.g. top:3") from None
    if k < 1:
        raise UsageError(f"--ica-component-ids {spec}: K must be at least 1")
    if templates is None or not templates.ranking:
        raise UsageError(
            f"--ica-component-ids {spec} needs a ranked networks file; rank it first with "
            "`fnscale templates rank NETWORKS.json --data DATA`, or list the ids, e.g. 0,3"
        )
    order = [int(c["id"]) for c in templates.ranking["components"]]
    if k > len(order):
        raise UsageError(
            f"--ica-component-ids {spec}: the file ranks {len(order)} components; use top:{len(order)} or fewer"
        )
    return order[:k]


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """`0-7,12` -> [0, 1, ..., 7, 12]; None or `all` -> every layer."""
    if spec is None or str(spec).strip().lower() in ("", "all"):
        return list(range(num_layers))
    out: list[int] = []
    try:
        for part in str(spec).split(","):
            lo, sep, hi = part.strip().partition("-")
            out.extend(range(int(lo), (int(hi) if sep else int(lo)) + 1))
    except ValueError:
        raise UsageError(f"bad layer spec {spec!r}; use e.g. 0-7,12") from None
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad or not out:
        raise UsageError(f"layers {bad or spec} out of range for a model with {num_layers} layers (0-{num_layers - 1})")
    return sorted(set(out))


def check_train_options(cfg) -> Templates | None:
    """Everything `fnscale train` can refuse before importing torch: the mask options, and the template against
    config.json when one is on disk already: a model folder, or the converted copy of the embedded default or a local
    .gguf file (other sources are checked once resolved, still before the weights load)."""
    check_ddp_timeout(cfg.ddp_timeout)
    templates = check_mask_options(cfg)
    check_output_folder(cfg.output_dir, "--output-dir")
    folder = local_config_folder(cfg.model, cfg.gguf_file) if templates is not None else None
    if folder is not None:
        check_template_fits_config(templates, str(folder))
    check_hub_model(cfg.model, cfg.gguf_file)
    return templates


def check_build_options(cfg) -> None:
    """`templates build`: what can be refused before the model loads (bounds and choices come with the options)."""
    check_ddp_timeout(cfg.ddp_timeout)
    check_output_folder(cfg.output, "--output")
    check_hub_model(cfg.model, cfg.gguf_file)


def check_output_folder(path: str, flag: str) -> None:
    """A folder fnscale will write into: neither it nor a folder above it may be a file."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path} is a file; pick a folder")
    check_parents(p, flag, path)


def check_output_file(path: str, flag: str) -> None:
    """A file fnscale will write: not a folder, and no folder above it may be a file."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name, e.g. {p / 'templates.json'}")
    check_parents(p, flag, path)


def check_parents(p: Path, flag: str, given: str) -> None:
    """The nearest existing folder above `p` must be a folder (makedirs would fail on a file with FileExistsError)."""
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {given} is not writable: {parent} is a file, not a folder; pick another path")
            return


def check_ddp_timeout(seconds: int) -> None:
    if seconds < 10:
        raise UsageError(f"--ddp-timeout {seconds} is too short for any collective; use at least 10 seconds")


def check_mask_combinations(cfg) -> None:
    """Masking options that only make sense together (templates, --mask-effect, --mask-control, forward-only
    kernels)."""
    if cfg.mask_mode == "none":
        if cfg.ica_template_path or cfg.ica_component_ids:
            raise UsageError("--ica-template-path/--ica-component-ids need --mask-mode lesion or preserve")
        given = [
            flag
            for flag, on in (
                ("--mask-effect", cfg.mask_effect is not None),
                ("--mask-control", cfg.mask_control != "none"),
            )
            if on
        ]
        if given:
            raise UsageError(f"{'/'.join(given)} need(s) --mask-mode lesion or preserve (and templates to mask)")
    if cfg.mask_control_seed is not None and cfg.mask_control != "random":
        raise UsageError("--mask-control-seed seeds the random control; add --mask-control random")
    if cfg.optimizer_slices == "on" and (cfg.mask_mode == "none" or cfg.mask_effect == "forward" or cfg.lora):
        raise UsageError(
            "--optimizer-slices on trains slices of the dense MLP weights: it needs --mask-mode lesion/preserve, "
            "--mask-effect update and --no-lora (LoRA keeps no dense optimizer state); drop it or change those"
        )
    if (cfg.mask_effect or "update") == "update" and (cfg.mask_kernel == "triton" or cfg.compact == "on"):
        raise UsageError(
            "--mask-kernel triton (CUDA) and --compact on compute forward masks, and with --mask-effect update nothing "
            "is masked "
            "in the forward pass; add --mask-effect forward or drop them"
        )


def check_mask_options(cfg) -> Templates | None:
    """The template a masked run will use, validated against the options; None when masks are off or computed."""
    check_mask_combinations(cfg)
    if cfg.mask_mode == "none":
        return None
    if not cfg.ica_template_path:
        parse_component_ids(cfg.ica_component_ids)  # computed templates are unranked: top:K is refused here
        return None  # templates are computed on the training data: ids and layers are checked once they exist
    templates = Templates.load(cfg.ica_template_path)
    ids = parse_component_ids(cfg.ica_component_ids, templates)
    templates.component_neurons(ids)  # refuses ids the template does not have
    if cfg.ica_layers:
        top = templates.num_layers or max(templates.layers) + 1
        chosen = parse_layers(cfg.ica_layers, top)
        outside = sorted(set(chosen) - set(templates.layers))
        if outside:
            raise UsageError(
                f"--ica-layers {cfg.ica_layers} names layers {outside} that the template does not cover (it has "
                f"{templates.layers})"
            )
    return templates


def check_template_fits_config(templates: Templates, model_path: str) -> None:
    """Layer count and width from config.json alone; a config without them (or a hub id) is left to the model load."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # a hub id or an unreadable file: the model load reports it, and the template is checked after it
    config = config.get("text_config") or config
    num_layers = config.get("num_hidden_layers")
    width = config.get("intermediate_size" if templates.site == "intermediate" else "hidden_size")
    if isinstance(num_layers, int) and isinstance(width, int):
        templates.check_compatible(num_layers, width, templates.site)
