"""`fnscale cl SEQUENCE.yaml --output DIR`: a sequence of tasks trained one after another (see fnscale.recipes.cl).

--list and --only INDEX split the work into independent jobs (one per SLURM array task: an arm at a seed and order,
or a single-task reference run); --report-only then scores the base once and writes the report from what has finished.
"""

from __future__ import annotations

import click

from fnscale.cli.options import CONTEXT
from fnscale.errors import UsageError


@click.command(name="cl", context_settings=CONTEXT)
@click.argument("sequence", type=click.Path(dir_okay=False))
@click.option(
    "--output",
    default=None,
    type=click.Path(file_okay=False),
    help="folder: base/, runs/ARM-seedS-orderK/stageN-TASK/, single/, cl.json, cl.md, figures/ "
    "[required unless --list]",
)
@click.option("--list", "list_jobs", is_flag=True, help="print one line per job (INDEX, JOB_ID, what) and exit")
@click.option(
    "--only", type=int, multiple=True, help="run only job INDEX (see --list; e.g. $SLURM_ARRAY_TASK_ID) [repeatable]"
)
@click.option(
    "--report-only",
    is_flag=True,
    help="train nothing: score the base if needed and write the report from finished jobs",
)
def cl_cmd(sequence, output, list_jobs, only, report_only):
    """Train the tasks of SEQUENCE in order for every arm, seed and order; score every task after every stage.

    Finished stages (STAGE/done.json) are skipped and a stage stopped mid-way resumes from its checkpoint,
    so an interrupted run continues where it stopped.
    """
    from fnscale.recipes import cl

    if list_jobs:
        for line in cl.listing(cl.load(sequence, None)):
            click.echo(line)
        return
    if not output:
        raise UsageError("--output DIR is required: the folder that holds the stages and the report")
    result = cl.run_cl(sequence, output, only=tuple(only), report_only=report_only)
    click.echo(f"ran {len(result['trained'])} job(s), skipped {len(result['skipped'])} finished")
    if result["report"] is not None:
        click.echo(f"report: {result['report']['files']['markdown']}")
