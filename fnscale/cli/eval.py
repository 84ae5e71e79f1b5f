"""`fnscale eval`: one command that scores the base model and its fine-tuned variants (see fnscale.recipes.evaluate).

Options come from `EvalConfig`, declared once with their defaults; torch loads only when the command runs.
"""

from __future__ import annotations

import click

from fnscale.cli.options import CONTEXT, config_option, echo_config, load_config, options_from, print_config_option
from fnscale.config import EvalConfig


@click.command(name="eval", context_settings=CONTEXT)
@config_option
@print_config_option
@options_from(EvalConfig)
@click.pass_context
def eval_cmd(ctx, config_file, print_config: bool, **values):
    """Measure what fine-tuning gained on the task and what it cost on retention data.

    Scores the base model and each --adapter / --finetuned model (or a --sequence of checkpoints)
    and writes report.json, report.md, task_vs_retention.png and TensorBoard scalars to --output.
    """
    from fnscale.models.paths import check_hub_model
    from fnscale.preflight import check_output_folder

    cfg = load_config(EvalConfig, ctx, config_file, values)
    if print_config:
        return echo_config(cfg)
    check_output_folder(cfg.output, "--output")
    check_hub_model(cfg.model, cfg.gguf_file)  # before torch loads: an uncached hub model offline fails at once
    from fnscale.recipes.evaluate import run_eval

    rep = run_eval(cfg)
    _echo_summary(rep)


def _echo_summary(rep: dict) -> None:
    from fnscale.eval.report import summary_table

    click.echo(summary_table(rep), nl=False)
    for r in rep["retention"]:
        click.echo(f"retention corpus {r['name']} ({rep['retention_metric']}) scored: {r['scored']}")
    if "continual" in rep:
        c = rep["continual"]
        fmt = lambda x: "n/a" if x is None else f"{x:+.4f}"  # noqa: E731
        click.echo(f"continual ({c['metric']}): ACC {c['ACC']:.4f}  BWT {fmt(c['BWT'])}  FWT {fmt(c['FWT'])}")
    click.echo(f"report: {rep['files']['markdown']}")
