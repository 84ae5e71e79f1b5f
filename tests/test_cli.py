"""The command line's shape: help without torch, no import cycle between its modules, one declaration per option."""

import dataclasses
import subprocess
import sys

import pytest

from fnscale.config import EvalConfig, TemplatesBuildConfig, TrainConfig

PROBE = """
import sys
from click.testing import CliRunner
from fnscale.cli.app import cli
res = CliRunner().invoke(cli, {argv!r})
assert res.exit_code == 0, res.output
print("torch" in sys.modules)
"""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["templates", "build", "--help"], ["eval", "--help"]])
def test_help_imports_no_torch(argv):
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", f"fnscale {' '.join(argv)} imported torch"


def test_cli_modules_import_in_any_order():
    """Each cli module imports alone in a fresh interpreter (a cycle would fail for one of the orders)."""
    for first in ("fnscale.cli.options", "fnscale.cli.eval", "fnscale.cli.templates", "fnscale.cli.app"):
        out = subprocess.run([sys.executable, "-c", f"import {first}; import fnscale.cli.app"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("cls,command", [(TrainConfig, ["train"]), (TemplatesBuildConfig, ["templates", "build"]), (EvalConfig, ["eval"])])
def test_every_config_field_is_an_option_with_its_default(cls, command):
    from fnscale.cli.app import cli

    cmd = cli
    for name in command:
        cmd = cmd.commands[name]
    params = {p.name: p for p in cmd.params}
    for f in dataclasses.fields(cls):
        assert f.name in params, f.name
        expected = () if isinstance(f.default, tuple) else f.default
        assert params[f.name].default == expected, f.name
    assert "config_file" in params


def test_shared_names_agree_with_the_modules_that_use_them():
    """config.py holds the torch-free copies the CLI offers as choices; they must match what the code accepts."""
    from fnscale import config, data, masking
    from fnscale.networks import pca, templates

    assert config.SCHEMAS == data.SCHEMAS
    assert config.SITES == masking.SITES == templates.SITES
    assert pca.BACKENDS == config.PCA_BACKENDS
