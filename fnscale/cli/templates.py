"""`fnscale templates build | show | compare | random | select | rank`.

`build` options come from `TemplatesBuildConfig` (declared once, also readable from `--config FILE.yaml`);
MODEL and DATASETs may be given as positional arguments too.
"""

from __future__ import annotations

import dataclasses

import click

from fnscale.cli.options import CONTEXT, config_option, echo_config, load_config, options_from, print_config_option
from fnscale.config import TemplatesBuildConfig, TemplatesRankConfig, TemplatesSelectConfig


@click.group(context_settings=CONTEXT)
def templates():
    """Build, inspect and compare functional-network templates."""


def model_and_datasets(
    model_arg: str | None, dataset_args: tuple[str, ...], model_opt: str | None, dataset_opt: tuple[str, ...]
):
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
    """Print a template file's summary: metadata, neurons per component per layer, and the ranking when it has one."""
    from fnscale.networks.templates import Templates, ranking_table

    t = Templates.load(path)
    click.echo(
        f"model: {t.model or t.name or '?'}  site: {t.site}  scope: {t.scope}  kind: {t.kind}  "
        f"components: {t.n_components}  percentile: {t.percentile}  layers: {len(t.layers)} x {t.neurons_per_layer} "
        "neurons"
    )
    if t.datasets:
        click.echo(f"datasets: {', '.join(t.datasets)}")
    if t.selection:
        how = t.selection
        chosen = f"share {how['share']}" if how.get("share") else f"components {how.get('components') or 'all'}"
        click.echo(
            f"selection: by {how['by']} like {how['like']} ({chosen}), seed {how['seed']}"
            + (f", data {', '.join(how['data'])}" if how.get("data") else "")
        )
    click.echo(t.coverage_table())
    if t.ranking:
        click.echo(ranking_table(t))


@templates.command(context_settings=CONTEXT)
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
def compare(a, b):
    """Best-match IoU between the components of two template files."""
    from fnscale.networks.templates import Templates
    from fnscale.networks.templates import compare as compare_templates

    click.echo(compare_templates(Templates.load(a), Templates.load(b)).table())


@templates.command(context_settings=CONTEXT)
@click.option(
    "--like",
    "like",
    required=True,
    type=click.Path(dir_okay=False),
    help="template whose per-layer sizes the control matches",
)
@click.option("--seed", type=int, default=0, help="seed of the random draw")
@click.option(
    "--output", required=True, type=click.Path(dir_okay=False), help="where to write the control template JSON"
)
def random(like, seed, output):
    """Save a random control: each component of --like replaced by as many random neurons per layer (same site)."""
    from fnscale.networks.controls import random_templates
    from fnscale.networks.templates import Templates
    from fnscale.preflight import check_output_file

    check_output_file(output, "--output")
    control = random_templates(Templates.load(like), seed)
    click.echo(
        f"saved {control.save(output)}: random control of {like} (seed {seed}), {len(control.components)} components"
    )


@templates.command(context_settings=CONTEXT)
@config_option
@options_from(TemplatesSelectConfig)
@click.pass_context
def select(ctx, config_file, **values):
    """Save a selection of as many neurons per layer as --like's chosen components, chosen --by another rule.

    activation: highest mean |activation| over the data's tokens; fisher: highest mean over examples of the squared
    gradient of the example's LM loss with respect to a per-neuron gate; random: a seeded draw (as --mask-control
    random). The file is a networks file of one component (id 0): train it with --ica-component-ids 0.
    """
    from fnscale.recipes.score_networks import run_select

    res = run_select(load_config(TemplatesSelectConfig, ctx, config_file, values))
    t = res["templates"]
    n = sum(v.size for v in t.components[0].values())
    click.echo(f"saved {res['path']}: {n} neurons on {len(t.components[0])} layers, by {t.selection['by']}")


@templates.command(context_settings=CONTEXT)
@click.argument("path", type=click.Path(dir_okay=False))
@config_option
@options_from(TemplatesRankConfig)
@click.pass_context
def rank(ctx, path, config_file, **values):
    """Rank PATH's components by the rise in loss on the data when each is lesioned at inference (key networks).

    Beside each rise: the mean rise when random sets of the same size per layer are lesioned, and their ratio.
    The ranking is recorded in the file; `--ica-component-ids top:K` then takes the K most important.
    """
    from fnscale.networks.templates import ranking_table
    from fnscale.recipes.score_networks import run_rank

    res = run_rank(path, load_config(TemplatesRankConfig, ctx, config_file, values))
    click.echo(ranking_table(res["templates"]))
    click.echo(f"saved {res['path']}")
