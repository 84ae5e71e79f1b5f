"""`fnscale train`: the options come from `TrainConfig`; the recipe is imported only when the command runs."""

from __future__ import annotations

import click

from fnscale.cli.options import (
    CONTEXT,
    config_option,
    echo_config,
    is_main,
    load_config,
    options_from,
    print_config_option,
)
from fnscale.config import TrainConfig


@click.command(context_settings=CONTEXT)
@config_option
@print_config_option
@options_from(TrainConfig)
@click.pass_context
def train(ctx, config_file, print_config: bool, **values):
    """Supervised fine-tuning (LoRA, QLoRA or full), optionally with functional-network masks.

    Runs as is on one device, or under `accelerate launch` for DDP and DeepSpeed ZeRO.
    """
    from fnscale.preflight import check_mask_combinations, check_train_options

    cfg = load_config(TrainConfig, ctx, config_file, values)
    if print_config:  # the options, checked as far as they can be without reading the files they name
        check_mask_combinations(cfg)
        return echo_config(cfg)
    check_train_options(cfg)  # mask and template mistakes in about a second, before torch is imported
    from fnscale.recipes.train import train as run_train

    summary = run_train(cfg)
    if is_main():
        click.echo("\nrun summary")
        for k, v in summary.items():
            click.echo(f"  {k:16s} {v:.4f}" if isinstance(v, float) else f"  {k:16s} {v}")
