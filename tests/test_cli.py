"""The command line's shape: help without torch, no import cycle between its modules, one declaration per option;
config files read like flags; the example configs resolve."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fnscale.config import EvalConfig, TemplatesBuildConfig, TrainConfig

PROBE = """
import sys
from click.testing import CliRunner
from fnscale.cli.app import cli
res = CliRunner().invoke(cli, {argv!r})
assert res.exit_code == 0, res.output
print("torch" in sys.modules)
"""


@pytest.mark.parametrize(
    "argv", [["--help"], ["train", "--help"], ["templates", "build", "--help"], ["eval", "--help"]]
)
def test_help_imports_no_torch(argv):
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", f"fnscale {' '.join(argv)} imported torch"


def test_cli_modules_import_in_any_order():
    """Each cli module imports alone in a fresh interpreter (a cycle would fail for one of the orders)."""
    for first in ("fnscale.cli.options", "fnscale.cli.eval", "fnscale.cli.templates", "fnscale.cli.app"):
        out = subprocess.run(
            [sys.executable, "-c", f"import {first}; import fnscale.cli.app"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "cls,command", [(TrainConfig, ["train"]), (TemplatesBuildConfig, ["templates", "build"]), (EvalConfig, ["eval"])]
)
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


# ---------------------------------------------------------------- config files typed like flags (issue 20 item 3)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "configs"


def _invoke(argv):
    from click.testing import CliRunner

    from fnscale.cli.app import cli

    return CliRunner().invoke(cli, argv)


def _printed(argv) -> dict:
    res = _invoke(argv)
    assert res.exit_code == 0, res.output
    return yaml.safe_load(res.stdout)


def test_yaml_values_are_read_as_their_flags_would_be(tmp_path):
    """YAML reads 1e-4 as text and a quoted "20" stays text: both become the option's type, like the flags."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        'learning_rate: 1e-4\nmax_steps: "20"\nlora: "no"\ndataset: one.jsonl\nlora_target_modules: [q_proj, v_proj]\n'
        "validation_split: 0\nmask_mode: lesion\nmask_effect: forward\ncompact: on\nica_component_ids: [0, 3]\n"
    )
    got = _printed(["train", "--config", str(cfg), "--print-config"])
    assert got["learning_rate"] == 1e-4 and isinstance(got["learning_rate"], float)
    assert got["max_steps"] == 20 and got["lora"] is False and got["compact"] == "on"
    assert (
        got["dataset"] == ["one.jsonl"]
        and got["ica_component_ids"] == "0,3"
        and got["lora_target_modules"] == "q_proj,v_proj"
    )
    assert got["validation_split"] == 0.0
    assert got["batch_size"] == TrainConfig.batch_size  # untouched options keep their defaults
    assert (
        _printed(["train", "--config", str(cfg), "--print-config", "--max-steps", "7"])["max_steps"] == 7
    )  # flags win


# (option, text): each is given as a flag and as a YAML value; both must succeed with the same value or both fail
SAME_RULES = [
    ("learning_rate", "3e-5"),
    ("learning_rate", "abc"),
    ("learning_rate", "-1"),
    ("learning_rate", "0"),
    ("max_steps", "20"),
    ("max_steps", "2.5"),
    ("batch_size", "0"),
    ("lr_scheduler", "linear"),
    ("lr_scheduler", "cosin"),
    ("dtype", "fp16"),
    ("schema", "chatml"),
    ("schema", "alpaca"),
    ("ica_percentile", "100"),
    ("ica_percentile", "97.5"),
    ("warmup_ratio", "1.5"),
    ("validation_split", "1"),
    ("ica_site", "mlp_output"),
    ("ica_site", "mlp"),
    ("max_samples", "0"),
]


@pytest.mark.parametrize("name,text", SAME_RULES, ids=[f"{n}={t}" for n, t in SAME_RULES])
def test_config_file_values_follow_the_flag_rules(tmp_path, name, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"# a comment\n{name}: {text}\n")
    by_flag = _invoke(["train", "--print-config", "--" + name.replace("_", "-"), text])
    by_file = _invoke(["train", "--print-config", "--config", str(cfg)])
    assert (by_flag.exit_code == 0) == (by_file.exit_code == 0), (by_flag.output, by_file.output)
    if by_flag.exit_code == 0:
        assert yaml.safe_load(by_flag.stdout)[name] == yaml.safe_load(by_file.stdout)[name]
    else:
        assert by_file.exit_code == 2 and f"{cfg} line 2: {name}: " in by_file.stderr, by_file.stderr


def test_print_config_round_trips_and_trains_nothing(tmp_path):
    first = _invoke(
        [
            "train",
            "--print-config",
            "--learning-rate",
            "1e-5",
            "--dataset",
            "a.jsonl",
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    assert first.exit_code == 0, first.output
    (tmp_path / "resolved.yaml").write_text(first.stdout)
    again = _invoke(["train", "--print-config", "--config", str(tmp_path / "resolved.yaml")])
    assert again.exit_code == 0 and again.stdout == first.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["lora_single_gpu", "qlora", "full_zero3_8gpu", "lesion_update_prebuilt"])
def test_example_train_configs_load_and_validate(name, tmp_path):
    """Each shipped config resolves (types, choices, bounds, mask combinations) and says what it sets, without training."""
    import dataclasses

    from fnscale.config import value_of

    path = EXAMPLES / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    got = _printed(["train", "--config", str(path), "--print-config"])
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, value in raw.items():
        expected = value_of(fields[key], value)
        assert got[key] == (list(expected) if isinstance(expected, tuple) else expected), key
    assert not Path(got["output_dir"]).exists()


def test_example_sweep_loads_and_each_run_validates():
    from fnscale.config import check_limits, typed
    from fnscale.preflight import check_mask_combinations
    from fnscale.recipes import sweep

    s = sweep.load(EXAMPLES / "sweep.yaml")
    assert len(s.runs) == 8 and {r.name for r in s.runs} >= {"full-ft", "lesion-update", "lesion-update-random"}
    for run in s.runs:
        cfg = TrainConfig(**typed(TrainConfig, sweep.resolved_options(s, run, Path("out"))))
        check_limits(cfg)
        check_mask_combinations(cfg)
    EvalConfig(**typed(EvalConfig, s.eval, command="eval"))


def test_zero3_example_names_a_shipped_launch_config():
    text = (EXAMPLES / "full_zero3_8gpu.yaml").read_text()
    named = re.findall(r"--config_file (\S+)", text)
    assert named and all((REPO / p).is_file() for p in named)


def test_docs_name_only_launch_configs_that_exist():
    for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md"), *EXAMPLES.glob("*.yaml")]:
        for path in re.findall(r"[\w./-]*launch_configs/[\w.-]+\.(?:yaml|json)", doc.read_text()):
            assert (REPO / path.lstrip("./")).is_file() or (REPO / "launch_configs" / Path(path).name).is_file(), (
                doc.name,
                path,
            )
        assert "configs/accelerate" not in doc.read_text(), doc.name


@pytest.mark.parametrize("command", [["train"], ["eval"], ["templates", "build"]])
def test_help_lists_txt_data(command):
    res = _invoke([*command, "--help"])
    assert res.exit_code == 0 and ".txt" in res.output


def test_launch_configs_lists_the_shipped_files():
    res = _invoke(["launch-configs", "deepspeed_zero3"])
    assert res.exit_code == 0 and Path(res.stdout.strip()).is_file()
    assert _invoke(["launch-configs", "zero9"]).exit_code == 2
