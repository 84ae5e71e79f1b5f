"""Click glue shared by every command module: options generated from config dataclasses, `--config FILE`,
`--print-config`.

Every `cli*` module imports this one and nothing imports back, so the CLI has no import cycle. It
imports click and fnscale.config only (no torch), so `fnscale --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import os

import click
import yaml

from fnscale.config import check_limits, click_type, config_file, merge, typed


def is_main() -> bool:
    """True on the process that prints (rank 0, or the only one)."""
    return os.environ.get("RANK", "0") == "0"


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110, "show_default": True}


def options_from(cls, only: tuple[str, ...] | None = None):
    """Click options for every field of a config dataclass (or the fields named in `only`): declared once,
    listed with defaults in --help."""

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            if only is not None and f.name not in only:
                continue
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "")
            if isinstance(f.default, bool):
                if "/" not in flag:
                    flag = f"{flag}/--no-{flag[2:]}" if f.default else flag
                fn = click.option(flag, f.name, default=f.default, is_flag=True, help=help_text)(fn)
            elif isinstance(f.default, tuple):
                fn = click.option(flag, f.name, multiple=True, default=(), type=str, help=help_text + " [repeatable]")(
                    fn
                )
            else:
                fn = click.option(flag, f.name, default=f.default, type=click_type(f), help=help_text)(fn)
        return fn

    return decorate


def config_option(fn):
    """`--config FILE.yaml`: option values from a file; flags given on the command line override it."""
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        default=None,
        help="YAML file of options (keys as --print-config shows them, values read as the flags read them); "
        "flags given here override it",
    )(fn)


def explicit_params(ctx: click.Context) -> set[str]:
    """Names of the options given on the command line (they beat the YAML config)."""
    return {name for name in ctx.params if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}


def load_config(cls, ctx: click.Context, path: str | None, values: dict):
    """The command's config object: defaults < the --config file < flags given on the command line.

    File values are typed and checked like flags (errors name the file, the line and the key); the bounds of the
    resolved options are checked too, so a mistake stops here, before anything loads."""
    command = ctx.command_path.partition(" ")[2] or ctx.info_name
    yaml_values = {}
    if path:
        raw, lines = config_file(path)
        yaml_values = typed(cls, raw, str(path), lines, command)
    cfg = merge(cls, yaml_values, values, explicit_params(ctx), command)
    check_limits(cfg)
    return cfg


def print_config_option(fn):
    """`--print-config`: show the resolved options as YAML (a valid --config file) and exit without running."""
    help_text = "print the resolved options as YAML (usable as --config) and exit"
    return click.option("--print-config", is_flag=True, help=help_text)(fn)


def echo_config(cfg) -> None:
    """The resolved options as YAML, in declaration order (tuples as lists)."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    click.echo(yaml.safe_dump(values, sort_keys=False, allow_unicode=True), nl=False)
