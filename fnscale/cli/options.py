"""Click glue shared by every command module: options generated from config dataclasses, `--config FILE`.

Every `cli*` module imports this one and nothing imports back, so the CLI has no import cycle. It
imports click and fnscale.config only (no torch), so `fnscale --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import os

import click

from fnscale.config import load_yaml, merge


def is_main() -> bool:
    """True on the process that prints (rank 0, or the only one)."""
    return os.environ.get("RANK", "0") == "0"


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
                fn = click.option(flag, f.name, multiple=True, default=(), type=str, help=help_text + " [repeatable]")(fn)
            else:
                fn = click.option(flag, f.name, default=f.default, type=_click_type(f), help=help_text)(fn)
        return fn

    return decorate


def config_option(fn):
    """`--config FILE.yaml`: option values from a file; flags given on the command line override it."""
    return click.option(
        "--config", "config_file", type=click.Path(dir_okay=False), default=None, help="YAML file of options; flags given here override it"
    )(fn)


def explicit_params(ctx: click.Context) -> set[str]:
    """Names of the options given on the command line (they beat the YAML config)."""
    return {name for name in ctx.params if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}


def load_config(cls, ctx: click.Context, config_file: str | None, values: dict):
    """The command's config object: defaults < the --config file < flags given on the command line."""
    yaml_values = load_yaml(config_file) if config_file else {}
    return merge(cls, yaml_values, values, explicit_params(ctx), command=ctx.command_path.partition(" ")[2] or ctx.info_name)
