"""`fnscale data show`: preview data as training will see it (shapes, counts, lengths, trained tokens)."""

from __future__ import annotations

import json
import sys

import click

from fnscale.cli.options import CONTEXT, options_from
from fnscale.config import TrainConfig

# Data options shared with `train`, declared once in TrainConfig.
SHARED = (
    "schema",
    "template",
    "prompt_column",
    "response_column",
    "train_on_inputs",
    "max_seq_length",
    "max_samples",
    "batch_size",
)


@click.group(name="data", context_settings=CONTEXT)
def data_group():
    """Inspect SFT data as training will see it."""


@data_group.command(context_settings=CONTEXT)
@click.argument("datasets", metavar="DATA...", nargs=-1)
@click.option(
    "--model",
    default=None,
    help="model whose tokenizer and chat template render the data; default: the embedded SmolLM2",
)
@click.option("-n", "n", default=3, help="examples to show")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON instead")
@options_from(TrainConfig, only=SHARED)
def show(datasets, model, n, as_json, max_seq_length, batch_size, **opts):
    """Schema, example counts, token lengths and the first examples with trained tokens marked.

    DATA takes the same specs as `train --dataset` (file, folder, glob, hub NAME[:CONFIG[:SPLIT]], :WEIGHT, .yaml).
    """
    from fnscale import data
    from fnscale.models import loading

    tokenizer = loading.load_tokenizer(loading.resolve_model(model))
    style = "brackets" if as_json or not sys.stdout.isatty() else "colour"
    report = data.preview(tokenizer, list(datasets), n, max_seq_length, data.DataOptions(**opts), style, batch_size)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for d in report["datasets"]:
        click.echo(f"{d['name']}: schema {d['schema']}, {d['examples']} examples, weight {d['weight']}")
    t = report["tokens"]
    click.echo(
        f"tokens per example: min {t['min']}  mean {t['mean']}  median {t['median']:g}  p95 {t['p95']:g}  max "
        f"{t['max']}; "
        f"{t['over_max_seq_length']} longer than --max-seq-length {t['max_seq_length']} (truncated, keeping the last "
        "response)"
    )
    pad = report["padding"]
    click.echo(
        f"padded batches of {pad['batch_size']} (--batch-size) are {pad['real_share']:.0%} real tokens: "
        f"--packing can speed training up by at most {pad['packing_gain_bound']:.2f}x on CPU"
    )
    for ex in report["examples"]:
        click.echo(
            f"\n--- {ex['dataset']} #{ex['index']}: {ex['tokens']} tokens, {ex['trained_tokens']} trained "
            f"({'bold green' if style == 'colour' else '[[in brackets]]'}) ---"
        )
        click.echo(ex["text"])
