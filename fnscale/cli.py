"""The `fnscale` command line: train, templates, eval, doctor.

User mistakes raise `FnscaleError`; `main` turns them into one line on stderr and an exit code,
with a traceback only under --debug.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import click

from fnscale.config import TrainConfig, load_yaml, merge
from fnscale.errors import FnscaleError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110, "show_default": True}


def _click_type(f: dataclasses.Field):
    if f.metadata.get("choices"):
        return click.Choice(f.metadata["choices"])
    t = str(f.type)
    if t.startswith("int"):
        return int
    if t.startswith("float"):
        return float
    return str


def options_from(cls):
    """Click options for every field of a config dataclass: declared once, listed with defaults in --help."""

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            if f.name == "debug":
                continue
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "")
            if isinstance(f.default, bool):
                if "/" not in flag:
                    flag = f"{flag}/--no-{flag[2:]}" if f.default else flag
                fn = click.option(flag, f.name, default=f.default, is_flag=True, help=help_text)(fn)
            elif isinstance(f.default, tuple):
                fn = click.option(flag, f.name, multiple=True, default=(), type=str, help=help_text + " [repeatable]")(fn)
            else:
                fn = click.option(flag, f.name, default=f.default, type=_click_type(f), help=help_text)(fn)
        return fn

    return decorate


def explicit_params(ctx: click.Context) -> set[str]:
    """Names of the options given on the command line (they beat the YAML config)."""
    return {name for name in ctx.params if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}


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
            if ctx.params.get("debug"):
                raise
            raise UserError(str(err), err.exit_code) from err
        except (MemoryError, RuntimeError) as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if ctx.params.get("debug") or not (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"):
                raise
            raise UserError("out of memory; lower --batch-size or --max-seq-length, or use --load-in-4bit or --gradient-checkpointing", 1) from err


@click.group(cls=FnscaleGroup, context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="show full tracebacks for errors")
@click.version_option(package_name="fnscale")
@click.pass_context
def cli(ctx, debug):
    """Functional-network selective fine-tuning: find networks (templates), mask them in SFT (train), measure forgetting (eval)."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@cli.command(context_settings=CONTEXT)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, help="YAML file of options; flags given here override it")
@options_from(TrainConfig)
@click.pass_context
def train(ctx, config_file, **values):
    """Supervised fine-tuning (LoRA, QLoRA or full), optionally with functional-network masks.

    Runs as is on one device, or under `accelerate launch` for DDP and DeepSpeed ZeRO.
    """
    from fnscale.train import train as run_train

    yaml_values = load_yaml(config_file) if config_file else {}
    cfg = merge(TrainConfig, yaml_values, values, explicit_params(ctx))
    summary = run_train(cfg)
    if _is_main():
        click.echo("\nrun summary")
        for k, v in summary.items():
            click.echo(f"  {k:16s} {v:.4f}" if isinstance(v, float) else f"  {k:16s} {v}")


@cli.command(context_settings=CONTEXT)
def doctor():
    """Platform, devices, dependency versions, optional pieces, and whether an HF token was found (never printed)."""
    from fnscale.doctor import report

    click.echo(report())


@cli.group(context_settings=CONTEXT)
def templates():
    """Build, inspect and compare functional-network templates."""


@cli.group(name="eval", context_settings=CONTEXT, invoke_without_command=False)
def eval_group():
    """Measure what fine-tuning gained on the task and lost on retention data."""


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _register_subcommands() -> None:
    """Commands that live in their own modules (imports stay light until a command runs)."""
    from fnscale import cli_eval, cli_sweep, cli_templates

    cli_templates.register(templates)
    cli_eval.register(eval_group, cli)
    cli_sweep.register(cli)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO if _is_main() else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "accelerate", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _register_subcommands()
    cli.main(args=argv, prog_name="fnscale")
