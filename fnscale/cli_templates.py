"""`fnscale templates build | show | compare`."""

from __future__ import annotations

import click

CONTEXT = {"show_default": True}


@click.command(context_settings=CONTEXT)
@click.argument("model_arg", metavar="[MODEL]", required=False)
@click.argument("dataset_args", metavar="[DATASET]...", nargs=-1)
@click.option("--model", "model_opt", default=None, help="model id, folder or .gguf (instead of the MODEL argument); default: the embedded SmolLM2")
@click.option("--dataset", "dataset_opt", multiple=True, help="data file or hub dataset (repeatable; instead of DATASET arguments); default: bundled sample data")
@click.option("--samples-per-dataset", default=100, help="examples drawn from each dataset")
@click.option("--components", default=10, help="number of ICA components (functional networks)")
@click.option("--percentile", default=98.0, help="loading percentile a neuron must pass (98 keeps ~2%)")
@click.option("--site", type=click.Choice(["intermediate", "mlp_output"]), default="intermediate", help="capture site: down-projection input or MLP output")
@click.option("--layers", default=None, help="layers to capture, e.g. 0-7,12 (default: all)")
@click.option("--scope", type=click.Choice(["global", "layer"]), default="global", help="one decomposition over all layers, or one per layer")
@click.option("--ica-kind", type=click.Choice(["temporal", "spatial"]), default="temporal", help="temporal ICA (the paper's) or spatial ICA")
@click.option("--pca-backend", type=click.Choice(["auto", "cuml", "torch", "sklearn"]), default="auto", help="PCA backend (auto: cuML, then torch on CUDA, then scikit-learn)")
@click.option("--output", default="ica_templates", help="output folder for global_templates.json, coverage.txt and coverage.png")
@click.option("--max-seq-length", default=512, help="truncate samples to this many tokens")
@click.option("--batch-size", default=8, help="samples per forward pass")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", help="model dtype")
@click.option("--cache-budget-gb", default=0.0, help="keep captured activations (fp16) in memory up to this size, skipping the recomputing passes")
@click.option("--seed", default=0, help="seed for sampling and FastICA")
@click.option("--gguf-file", default=None, help="GGUF file inside MODEL")
@click.option("--trust-remote-code", is_flag=True, help="allow custom model code from the hub")
def build(model_arg, dataset_args, model_opt, dataset_opt, **kw):
    """Find functional networks of MODEL on DATASET(s) and save them as templates.

    Under `accelerate launch`, each process captures its share of the samples and the results are merged.
    """
    from fnscale.networks.build import run_build

    positional = ([model_arg] if model_arg else []) + list(dataset_args)
    if model_opt:  # with --model, every positional argument is a dataset
        model, datasets = model_opt, list(dataset_opt) + positional
    else:
        model, datasets = (positional[0] if positional else None), list(dataset_opt) + positional[1:]
    res = run_build(
        model, datasets, kw.pop("output"), samples_per_dataset=kw.pop("samples_per_dataset"),
        n_components=kw.pop("components"), layers_spec=kw.pop("layers"), kind=kw.pop("ica_kind"), backend=kw.pop("pca_backend"), **kw,
    )
    if "path" in res:  # the main process wrote the files
        click.echo(res["templates"].coverage_table())
        click.echo(f"\nsaved {res['path']}, {res['coverage']} and {res['heatmap']}")


@click.command(context_settings=CONTEXT)
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


@click.command(context_settings=CONTEXT)
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
def compare(a, b):
    """Best-match IoU between the components of two template files."""
    from fnscale.networks.templates import Templates
    from fnscale.networks.templates import compare as compare_templates

    click.echo(compare_templates(Templates.load(a), Templates.load(b)).table())


def register(group) -> None:
    for cmd in (build, show, compare):
        if cmd.name not in group.commands:
            group.add_command(cmd)
