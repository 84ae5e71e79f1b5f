"""The `fnscale` command line: train, templates, eval, data, doctor.

User mistakes raise `FnscaleError`; `main` turns them into one line on stderr and an exit code,
with a traceback only under --debug (the exit code stays the same).
"""

from __future__ import annotations

import logging
import traceback

import click

from fnscale.cli.cl import cl_cmd
from fnscale.cli.data import data_group
from fnscale.cli.eval import eval_cmd
from fnscale.cli.options import CONTEXT, is_main
from fnscale.cli.sweep import sweep_cmd
from fnscale.cli.templates import templates
from fnscale.cli.train import train
from fnscale.errors import FnscaleError, UsageError


class UserError(click.ClickException):
    """A FnscaleError as Click shows it: one line, `error: ...`, and the error's exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class FnscaleGroup(click.Group):
    """Turns user mistakes raised anywhere below into one-line errors (tracebacks only with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FnscaleError as err:
            if ctx.params.get("debug"):  # the traceback, then the same exit code as without --debug
                traceback.print_exc()
                ctx.exit(err.exit_code)
            raise UserError(str(err), err.exit_code) from err
        except KeyboardInterrupt as err:  # a second Ctrl-C (the first one checkpoints): stop at once
            if ctx.params.get("debug"):
                raise
            raise UserError(
                "interrupted; nothing saved since the last checkpoint (resume with --resume-from-checkpoint auto)", 130
            ) from err
        except (MemoryError, RuntimeError) as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if ctx.params.get("debug") or not (
                isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            ):
                raise
            raise UserError(
                "out of memory; lower --batch-size or --max-seq-length, or use --load-in-4bit or "
                "--gradient-checkpointing",
                1,
            ) from err


@click.group(cls=FnscaleGroup, context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="show full tracebacks for errors")
@click.version_option(package_name="fnscale")
@click.pass_context
def cli(ctx, debug):
    """Functional-network selective fine-tuning: find networks (templates), mask them in SFT (train), measure forgetting
    (eval)."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@cli.command(context_settings=CONTEXT)
def doctor():
    """Platform, devices, dependency versions, optional pieces, and whether an HF token was found (never printed)."""
    from fnscale.doctor import report

    click.echo(report())


@cli.command(name="launch-configs", context_settings=CONTEXT)
@click.argument("name", required=False)
def launch_configs(name):
    """The shipped `accelerate launch --config_file` files; with NAME (e.g. deepspeed_zero3), print only its path.

    Example: accelerate launch --config_file "$(fnscale launch-configs deepspeed_zero3)" -m fnscale train ...
    """
    from fnscale.runtime.distributed import launch_configs_folder

    files = sorted(launch_configs_folder().glob("*.yaml"))
    if name is None:
        for f in files:
            click.echo(f"{f.stem:24s} {f}")
        return
    chosen = [f for f in files if f.stem == name.removesuffix(".yaml")]
    if not chosen:
        raise UsageError(f"no launch config {name!r}; pick one of {', '.join(f.stem for f in files)}")
    click.echo(str(chosen[0]))


for command in (train, templates, eval_cmd, data_group, sweep_cmd, cl_cmd):
    cli.add_command(command)


def main(argv=None) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main() else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "accelerate", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from fnscale.runtime.distributed import exit_process, joined_group, shutdown

    try:
        cli.main(args=argv, prog_name="fnscale")
    except (
        SystemExit
    ) as done:  # Click ends every command this way, with its status: keep it, whatever the teardown does
        exit_process(done.code)
        raise
    except BaseException as err:  # a traceback under --debug, or Ctrl-C outside training
        if joined_group():  # show it, then leave like any rank of a group (no interpreter teardown)
            traceback.print_exc()
            exit_process(130 if isinstance(err, KeyboardInterrupt) else getattr(err, "exit_code", 1))
        shutdown()
        raise
