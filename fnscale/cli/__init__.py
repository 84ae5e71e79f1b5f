"""The `fnscale` command line: one module per command group, all built on `options`."""

from fnscale.cli.app import cli, main

__all__ = ["cli", "main"]
