"""`fnscale sweep CONFIG.yaml --output DIR`: a grid of training runs, scored and compared (see fnscale.recipes.sweep).

--list and --only INDEX split the sweep into independent runs (one per SLURM array task);
--report-only then scores the base once and writes the report from whatever has finished.
"""

from __future__ import annotations

import click

from fnscale.cli.options import CONTEXT
from fnscale.errors import UsageError


@click.command(name="sweep", context_settings=CONTEXT)
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--output",
    default=None,
    type=click.Path(file_okay=False),
    help="sweep folder: base/, runs/NAME-seedS/, sweep.json, sweep.md, pareto.png [required unless --list]",
)
@click.option("--list", "list_runs", is_flag=True, help="print one line per run (INDEX, RUN_ID, options) and exit")
@click.option(
    "--only",
    type=int,
    multiple=True,
    help="train and score only run INDEX (see --list; e.g. $SLURM_ARRAY_TASK_ID) [repeatable]",
)
@click.option(
    "--report-only",
    is_flag=True,
    help="train nothing: score the base if needed and write the report from finished runs",
)
def sweep_cmd(config, output, list_runs, only, report_only):
    """Train every configuration of CONFIG over its seeds, score each with `eval`, and write a Pareto report.

    Finished runs (RUN/done.json) are skipped, so an interrupted sweep resumes where it stopped.
    """
    from fnscale.recipes import sweep

    if not list_runs and not output:
        raise UsageError("--output DIR is required: the folder that holds the runs and the report")
    if list_runs:
        for line in sweep.listing(sweep.load(config)):
            click.echo(line)
        return
    result = sweep.run_sweep(config, output, only=tuple(only), report_only=report_only)
    click.echo(f"trained {len(result['trained'])} run(s), skipped {len(result['skipped'])} finished")
    if result["report"] is not None:
        click.echo(f"report: {result['report']['files']['markdown']}")
