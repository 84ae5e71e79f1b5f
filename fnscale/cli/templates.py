"""`fnscale templates build | show | compare | random`.

`build` options come from `TemplatesBuildConfig` (declared once, also readable from `--config FILE.yaml`);
MODEL and DATASETs may be given as positional arguments too.
"""

from __future__ import annotations

import dataclasses

import click

from fnscale.cli.options import CONTEXT, config_option, echo_config, load_config, options_from, print_config_option
from fnscale.config import TemplatesBuildConfig


@click.group(context_settings=CONTEXT)
def templates():
    """Build, inspect and compare functional-network templates."""


def model_and_datasets(model_arg: str | None, dataset_args: tuple[str, ...], model_opt: str | None, dataset_opt: tuple[str, ...]):
    """(model, datasets) from the positional and named forms: with --model, every positional argument is a dataset."""
    positional = ([model_arg] if model_arg else []) + list(dataset_args)
    if model_opt:
        return model_opt, list(dataset_opt) + positional
    return (positional[0] if positional else None), list(dataset_opt) + positional[1:]


@templates.command(context_settings=CONTEXT)
@click.argument("model_arg", metavar="[MODEL]", required=False)
@click.argument("dataset_args", metavar="[DATASET]...", nargs=-1)
@config_option
@print_config_option
@options_from(TemplatesBuildConfig)
@click.pass_context
def build(ctx, model_arg, dataset_args, config_file, print_config: bool, **values):
    """Find functional networks of MODEL on DATASET(s) and save them as templates.

    A model or datasets given on the command line (as arguments or flags) replace those of --config.
    Under `accelerate launch`, each process captures its share of the samples and the results are merged.
    """
    from fnscale.preflight import check_build_options

    cfg = load_config(TemplatesBuildConfig, ctx, config_file, values)
    model, datasets = model_and_datasets(model_arg, dataset_args, values["model"], values["dataset"])
    cfg = dataclasses.replace(cfg, model=model or cfg.model, dataset=tuple(datasets) or cfg.dataset)
    if print_config:
        return echo_config(cfg)
    check_build_options(cfg)  # before torch and the weights load
    from fnscale.recipes.build_networks import run_build

    res = run_build(cfg)
    if "path" in res:  # the main process wrote the files
        click.echo(res["templates"].coverage_table())
        click.echo(f"\nsaved {res['path']}, {res['coverage']} and {res['heatmap']}")


@templates.command(context_settings=CONTEXT)
@click.argument("path", type=click.Path(dir_okay=False))
def show(path):
    """Print a template file's summary: metadata and neurons per component per layer."""
    from fnscale.networks.templates import Templates

    t = Templates.load(path)
    click.echo(f"model: {t.model or t.name or '?'}  site: {t.site}  scope: {t.scope}  kind: {t.kind}  "
               f"components: {t.n_components}  percentile: {t.percentile}  layers: {len(t.layers)} x {t.neurons_per_layer} neurons")
    if t.datasets:
        click.echo(f"datasets: {', '.join(t.datasets)}")
    click.echo(t.coverage_table())


@templates.command(context_settings=CONTEXT)
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
def compare(a, b):
    """Best-match IoU between the components of two template files."""
    from fnscale.networks.templates import Templates
    from fnscale.networks.templates import compare as compare_templates

    click.echo(compare_templates(Templates.load(a), Templates.load(b)).table())


@templates.command(context_settings=CONTEXT)
@click.option("--like", "like", required=True, type=click.Path(dir_okay=False), help="template whose per-layer sizes the control matches")
@click.option("--seed", type=int, default=0, help="seed of the random draw")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="where to write the control template JSON")
def random(like, seed, output):
    """Save a random control: each component of --like replaced by as many random neurons per layer (same site)."""
    from fnscale.networks.controls import random_templates
    from fnscale.networks.templates import Templates
    from fnscale.preflight import check_output_file

    check_output_file(output, "--output")
    control = random_templates(Templates.load(like), seed)
    click.echo(f"saved {control.save(output)}: random control of {like} (seed {seed}), {len(control.components)} components")
