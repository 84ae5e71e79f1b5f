"""fnscale sweep: grid x seeds expansion, real runs with done-markers and restart, --only, the report, the Pareto front."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fnscale.errors import RunError, UsageError
from fnscale.eval import stats, sweep_report
from fnscale.recipes import sweep

FNSCALE = [sys.executable, "-m", "fnscale"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
RETENTION = "the sun rises in the east and sets in the west .\n\nwater boils at one hundred degrees .\n"


def _write(path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


# ---------------------------------------------------------------- pure parts


def test_pareto_front_on_hand_made_points():
    points = [
        (1.0, 10.0),  # most gain: on the front
        (0.8, 4.0),  # dominated by (0.9, 4.0)
        (0.5, 5.0),  # dominated by (0.9, 4.0)
        (0.9, 4.0),  # on the front
        (1.0, 10.0),  # equal to the first: neither dominates the other
        (0.2, 1.0),  # least cost: on the front
        (None, 0.0),  # missing: never on the front, dominates nothing
        (0.1, float("nan")),
    ]
    assert sweep_report.pareto_front(points) == [True, False, False, True, True, True, False, False]
    assert sweep_report.pareto_front([]) == []


def test_run_row_and_seed_statistics_by_hand():
    base = {"task_loss": {"task": 4.0}, "retention_ppl": {"a": 100.0, "b": 50.0}}
    done = {
        "run": "x-seed1",
        "name": "x",
        "seed": 1,
        "options": {},
        "task_loss": {"task": 3.0},
        "retention_ppl": {"a": 110.0, "b": 60.0},
    }
    row = sweep_report.run_row(done, base)
    assert row["task_gain"] == pytest.approx(1.0) and row["task_loss_delta"] == pytest.approx(-1.0)
    assert row["retention_cost_pct"] == pytest.approx((10.0 + 20.0) / 2)  # mean over corpora of the relative rise
    assert row["retention_ppl_delta"] == pytest.approx({"a": 10.0, "b": 10.0})
    rows = [
        dict(row, seed=1),
        dict(row, seed=2, task_gain=0.8, retention_cost_pct=5.0),
        dict(row, name="y", task_gain=0.5, retention_cost_pct=20.0),
    ]
    configs = sweep_report.summarise(rows, ["x", "y"], ["a", "b"], reference="x")
    x, y = configs
    assert x["task_gain"]["mean"] == pytest.approx(0.9) and x["task_gain"]["sd"] == pytest.approx(math.sqrt(0.02))
    assert x["retention_cost_pct"]["mean"] == pytest.approx(10.0) and y["task_gain"]["sd"] is None
    assert (x["pareto"], y["pareto"]) == (True, False)
    assert y["gain_share_of_reference"] == pytest.approx(0.5 / 0.9) and y["cost_share_of_reference"] == pytest.approx(
        2.0
    )


# Student's sleep data (Cushny & Peebles 1905): extra hours of sleep of 10 patients under two drugs. R's
# t.test(extra ~ group, data = sleep, paired = TRUE) gives mean difference -1.58, t = -4.0621, df = 9, p = 0.002833,
# 95 percent confidence interval -2.4598858 -0.7001142.
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_paired_difference_on_students_sleep_data():
    d = stats.paired_difference(dict(enumerate(SLEEP_1)), dict(enumerate(SLEEP_2)))
    assert d["n"] == 10 and d["mean"] == pytest.approx(-1.58)
    assert (d["low"], d["high"]) == (pytest.approx(-2.4598858, abs=1e-7), pytest.approx(-0.7001142, abs=1e-7))
    assert d["t"] == pytest.approx(-4.0621, abs=1e-4) and d["p"] == pytest.approx(0.002833, abs=1e-6)
    assert d["excludes_zero"] is True
    scipy_stats = pytest.importorskip("scipy.stats")
    ref = scipy_stats.ttest_rel(SLEEP_1, SLEEP_2)
    assert d["t"] == pytest.approx(ref.statistic, rel=1e-12) and d["p"] == pytest.approx(ref.pvalue, rel=1e-9)


def test_paired_difference_pairs_by_seed_and_says_when_it_cannot():
    # differences 1..5 on seeds 1-5 (seed 6 finished in a only, seed 7 is missing a value): mean 3, sd sqrt(2.5),
    # t(0.975, 4) = 2.776445 (tables), so the interval is 3 -/+ 2.776445 * sqrt(2.5 / 5) = 3 -/+ 1.963243
    a = {1: 11.0, 2: 12.0, 3: 13.0, 4: 14.0, 5: 15.0, 6: 99.0, 7: None}
    b = {5: 10.0, 4: 10.0, 3: 10.0, 2: 10.0, 1: 10.0, 7: 10.0}
    d = stats.paired_difference(a, b)
    assert (
        d["seeds"] == [1, 2, 3, 4, 5] and d["mean"] == pytest.approx(3.0) and d["sd"] == pytest.approx(math.sqrt(2.5))
    )
    assert d["low"] == pytest.approx(3 - 1.963243, abs=1e-6) and d["high"] == pytest.approx(3 + 1.963243, abs=1e-6)
    assert d["excludes_zero"] is True
    within = stats.paired_difference({1: 1.0, 2: -1.0, 3: 0.5}, {1: 0.0, 2: 0.0, 3: 0.0})
    assert within["low"] < 0 < within["high"] and within["excludes_zero"] is False  # inside the spread: not shown
    one = stats.paired_difference({1: 2.0}, {1: 1.0, 2: 0.0})
    assert one["n"] == 1 and one["mean"] == 1.0 and one["low"] is None and one["excludes_zero"] is None
    same = stats.paired_difference({1: 2.0, 2: 3.0}, {1: 1.0, 2: 2.0})  # the same difference every seed
    assert (same["low"], same["high"], same["excludes_zero"], same["t"]) == (1.0, 1.0, True, None)


def test_report_compares_pairs_by_seed_and_draws_the_front():
    def row(name, seed, gain, cost):
        return {"name": name, "seed": seed, "task_gain": gain, "retention_cost_pct": cost}

    rows = [row("a", s, g, c) for s, g, c in zip(range(10), SLEEP_1, SLEEP_2)]
    rows += [row("b", s, g, c) for s, g, c in zip(range(10), SLEEP_2, SLEEP_1)]
    rows += [row("c", 0, 1.0, 1.0)]
    comps = sweep_report.comparisons(rows, [("a", "b"), ("a", "c")])
    g = comps[0]["task_gain"]
    assert (comps[0]["a"], comps[0]["b"]) == ("a", "b") and g["mean"] == pytest.approx(-1.58) and g["excludes_zero"]
    assert g["high"] == pytest.approx(-0.7001142, abs=1e-7) and comps[0]["retention_cost_pct"]["mean"] == pytest.approx(
        1.58
    )
    assert comps[1]["task_gain"]["n"] == 1 and comps[1]["task_gain"]["excludes_zero"] is None
    lines = "\n".join(sweep_report.comparison_table(comps))
    assert (
        "Student's t" in lines
        and "| a - b | 10 | -1.580 [-2.460, -0.700] | **yes** | +1.58 [+0.70, +2.46] | **yes** |" in lines
    )
    assert "| a - c | 1 | -0.300 (one seed: no interval) | n/a |" in lines
    configs = [
        {"pareto": p, "task_gain": {"mean": g}, "retention_cost_pct": {"mean": c}}
        for p, g, c in [(True, 2.0, 5.0), (False, 0.5, 3.0), (True, 1.0, 1.0), (True, 3.0, 9.0)]
    ]
    assert sweep_report.front_line(configs) == [(1.0, 1.0), (5.0, 2.0), (9.0, 3.0)]


@pytest.mark.parametrize(
    "compare, message",
    [
        ([["a", "nope"]], "'nope' is not a configuration name"),
        ([["a", "a"]], "compares a configuration with itself"),
        (["a"], "list of configuration pairs"),
        ({"a": "b"}, "list of configuration pairs"),
    ],
)
def test_bad_compare_lists_are_refused(tmp_path, compare, message):
    cfg = {"seeds": [1], "runs": [{"name": "a"}, {"name": "b"}], "compare": compare}
    with pytest.raises(UsageError, match=message):
        sweep.load(_write(tmp_path / "s.yaml", cfg))
    cfg["compare"] = [["a", "b"], ["b", "a"]]
    assert sweep.load(_write(tmp_path / "s.yaml", cfg)).compare == [("a", "b"), ("b", "a")]


def test_load_expands_runs_and_grid_over_seeds(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    cfg = {
        "train": {"dataset": "data.jsonl", "max-steps": 2},
        "eval": {"task": "data.jsonl"},
        "seeds": [1, 2],
        "runs": [{"name": "full", "lora": False}, {"name": "low-lr", "lora": False, "learning_rate": 1e-5}],
        "grid": [
            {
                "name": "mask",
                "options": {"lora": False},
                "axes": {"mask_mode": ["lesion", "preserve"], "ica_percentile": [95, 98]},
            }
        ],
        "reference": "full",
    }
    s = sweep.load(_write(tmp_path / "s.yaml", cfg))
    assert len(s.configs) == 2 + 4 and len(s.runs) == 6 * 2
    assert [r.run_id for r in s.runs[:4]] == ["full-seed1", "full-seed2", "low-lr-seed1", "low-lr-seed2"]
    assert [r.index for r in s.runs] == list(range(12))
    assert s.runs[4].name == "mask-mask_mode=lesion-ica_percentile=95" and s.runs[4].options == {
        "lora": False,
        "mask_mode": "lesion",
        "ica_percentile": 95,
    }
    assert s.train == {
        "dataset": str(tmp_path / "data.jsonl"),
        "max_steps": 2,
    }  # relative to the sweep file, dashes accepted
    opts = sweep.resolved_options(s, s.runs[3], tmp_path / "out")
    assert (
        opts["seed"] == 2 and opts["learning_rate"] == 1e-5 and opts["output_dir"].endswith("runs/low-lr-seed2/train")
    )
    assert len(sweep.listing(s)) == 12 and sweep.listing(s)[0].startswith("0\tfull-seed1\tlora=False")
    assert sweep.train_command(s, tmp_path / "c.yaml") == [
        sys.executable,
        "-m",
        "fnscale",
        "train",
        "--config",
        str(tmp_path / "c.yaml"),
    ]
    s.launcher = "accelerate launch --config_file 'my config.yaml'"  # runs under Accelerate: `accelerate launch -m fnscale train ...`
    assert sweep.train_command(s, tmp_path / "c.yaml")[:5] == [
        "accelerate",
        "launch",
        "--config_file",
        "my config.yaml",
        "-m",
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"runs": [{"name": "a", "learning_rte": 1}]}, "unknown option(s) learning_rte"),
        ({"runs": [{"name": "a", "seed": 3}]}, "cannot be set here"),
        ({"runs": [{"name": "a", "model": "x"}]}, "cannot be set here"),
        ({"runs": [{"name": "a"}, {"name": "a"}]}, "must be unique"),
        ({"seeds": "1"}, "list of integers"),
        ({"runs": []}, "no runs"),
        ({"reference": "nope"}, "not a run name"),
        ({"eval": {"output": "x"}}, "sweep chooses the models"),
        ({"eval": {"gguf-file": "x.gguf"}}, "sweep chooses the models"),  # dashes read as underscores before the check
        ({"eval": {"max_seq_lenth": 32}}, "eval: unknown option(s) max_seq_lenth; see `fnscale eval --help`"),
        ({"grid": {"axes": {"learning_rate": 1e-4}}}, "non-empty list"),
        ({"networks": {"components": 2, "output": "x"}}, "networks: model, gguf_file and output are the sweep's"),
        ({"networks": {"componets": 2}}, "networks: unknown option(s) componets; see `fnscale templates build --help`"),
        ({"runs": [{"name": "a", "ica_template_path": "networks"}]}, "names the networks a `networks` section builds"),
    ],
)
def test_bad_sweep_files_are_one_line_usage_errors(tmp_path, change, message):
    cfg = {"seeds": [1], "runs": [{"name": "a"}], **change}
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sweep.load(_write(tmp_path / "s.yaml", cfg))


def test_cli_reports_a_bad_sweep_file_in_one_line(tmp_path):
    path = _write(tmp_path / "s.yaml", {"runs": [{"name": "a", "lerning_rate": 1}]})
    p = subprocess.run(
        [*FNSCALE, "sweep", path, "--output", str(tmp_path / "o")], capture_output=True, text=True, env=ENV, check=False
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: runs[0] (a): unknown option(s) lerning_rate")


# ---------------------------------------------------------------- real runs (tiny model, one step each)


@pytest.fixture()
def tiny_sweep(tmp_path, tiny_llama, sft_file):
    (tmp_path / "retention.txt").write_text(RETENTION)
    cfg = {
        "train": {
            "model": tiny_llama,
            "dataset": sft_file,
            "validation_split": 0.0,
            "max_steps": 1,
            "batch_size": 4,
            "max_seq_length": 64,
            "learning_rate": 1e-2,
            "save_steps": 0,
            "eval_steps": 0,
            "report_to": "none",
        },
        "eval": {
            "task": sft_file,
            "task_split": "all",
            "retention": ["retention.txt"],
            "generate": 0,
            "max_seq_length": 64,
        },
        "seeds": [1, 2],
        "runs": [{"name": "full", "lora": False}, {"name": "lora", "lora": True, "lora_r": 4}],
        "reference": "full",
        "compare": [["lora", "full"]],
    }
    return _write(tmp_path / "sweep.yaml", cfg), tmp_path / "out"


def _mtimes(out):
    return {p: p.stat().st_mtime_ns for p in out.glob("runs/*/train/summary.json")}


def test_sweep_runs_scores_reports_and_skips_finished_runs(tiny_sweep):
    path, out = tiny_sweep
    first = sweep.run_sweep(path, str(out), only=(2,))  # one run, as a SLURM array task would
    assert first == {"trained": ["lora-seed1"], "skipped": [], "report": None}
    assert [p.parent.name for p in out.glob("runs/*/done.json")] == ["lora-seed1"] and not (out / "sweep.json").exists()

    rep = sweep.run_sweep(path, str(out))
    assert rep["trained"] == ["full-seed1", "full-seed2", "lora-seed2"] and rep["skipped"] == ["lora-seed1"]
    data = json.loads((out / "sweep.json").read_text())
    assert [r["run"] for r in data["runs"]] == ["full-seed1", "full-seed2", "lora-seed1", "lora-seed2"] and data[
        "missing"
    ] == []
    for r in data["runs"]:
        done = json.loads((out / "runs" / r["run"] / "done.json").read_text())
        report = json.loads(
            (out / "runs" / r["run"] / "eval" / "report.json").read_text()
        )  # the eval machinery's own report
        assert r["task_loss"] == done["task_loss"]["task"] == report["models"][0]["task"]["task"]["loss"]
        assert r["task_gain"] == pytest.approx(data["base"]["task_loss"]["task"] - r["task_loss"])
        cost = 100 * (r["retention_ppl"]["retention"] / data["base"]["retention_ppl"]["retention"] - 1)
        assert r["retention_cost_pct"] == pytest.approx(cost)
        assert yaml.safe_load((out / "runs" / r["run"] / "config.yaml").read_text())["seed"] == r["seed"]
    full = json.loads((out / "runs/full-seed1/train/summary.json").read_text())["config"]
    assert full["lora"] is False and full["seed"] == 1 and full["max_steps"] == 1
    assert (out / "runs/lora-seed1/train/merged/config.json").is_file()  # LoRA runs are scored merged
    assert [c["name"] for c in data["configs"]] == ["full", "lora"] and all(
        c["seeds"] == [1, 2] for c in data["configs"]
    )
    assert any(c["pareto"] for c in data["configs"])
    assert data["runs"][0]["task_loss"] != data["runs"][1]["task_loss"]  # seeds differ in data order and init
    md = (out / "sweep.md").read_text()
    assert "| full | 2 |" in md and "| lora | 2 |" in md and "base model" in md
    pair = data["comparisons"][0]
    by_run = {r["run"]: r for r in data["runs"]}
    diffs = [by_run[f"lora-seed{s}"]["task_gain"] - by_run[f"full-seed{s}"]["task_gain"] for s in (1, 2)]
    assert (pair["a"], pair["b"]) == ("lora", "full") and pair["task_gain"]["seeds"] == [1, 2]
    assert (
        pair["task_gain"]["mean"] == pytest.approx(sum(diffs) / 2)
        and pair["task_gain"]["low"] < pair["task_gain"]["high"]
    )
    assert "## Paired comparisons" in md and "| lora - full | 2 |" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = _mtimes(out)
    again = sweep.run_sweep(path, str(out))
    assert again["trained"] == [] and len(again["skipped"]) == 4 and _mtimes(out) == before
    assert sweep.run_sweep(path, str(out), report_only=True)["trained"] == []


def test_report_only_lists_unfinished_runs_and_changed_options_are_refused(tiny_sweep):
    path, out = tiny_sweep
    assert sweep.run_sweep(path, str(out), only=(0,))["trained"] == ["full-seed1"]
    rep = sweep.run_sweep(path, str(out), report_only=True)["report"]
    assert rep["missing"] == ["full-seed2", "lora-seed1", "lora-seed2"] and [r["run"] for r in rep["runs"]] == [
        "full-seed1"
    ]
    assert "Not finished (3)" in (out / "sweep.md").read_text()
    assert "retention metric `retention/2` (plain text scored on its own tokens" in (out / "sweep.md").read_text()
    cfg = yaml.safe_load(Path(path).read_text())
    cfg["runs"][0]["learning_rate"] = 1e-3
    _write(out.parent / "sweep.yaml", cfg)
    with pytest.raises(UsageError, match="made with other train or eval options"):
        sweep.run_sweep(path, str(out), only=(0,))
    cfg["runs"][0].pop("learning_rate")
    cfg["eval"]["max_seq_length"] = 32  # other eval options: the base and the runs would be scored differently
    _write(out.parent / "sweep.yaml", cfg)
    with pytest.raises(UsageError, match="made with other train or eval options"):
        sweep.run_sweep(path, str(out), report_only=True)
    with pytest.raises(UsageError, match="runs 0-3"):
        sweep.run_sweep(path, str(out), only=(4,))


def test_a_failed_run_stops_the_sweep_with_its_error_line(tiny_sweep):
    path, out = tiny_sweep
    cfg = yaml.safe_load(Path(path).read_text())
    cfg["runs"][0]["max_seq_length"] = 0  # `fnscale train` refuses it
    _write(out.parent / "sweep.yaml", cfg)
    with pytest.raises(
        RunError,
        match=r"run full-seed1 failed \(exit 2\): error: \S+config.yaml line \d+: max_seq_length: 0 must be at least 1",
    ):
        sweep.run_sweep(path, str(out), only=(0,))
    assert not (out / "runs/full-seed1/done.json").exists() and (out / "runs/full-seed1/train.log").is_file()


def test_a_missing_templates_file_is_refused_before_anything_trains(tiny_sweep):
    path, out = tiny_sweep
    cfg = yaml.safe_load(Path(path).read_text())
    cfg["runs"].append(
        {
            "name": "masked",
            "mask_mode": "lesion",
            "mask_effect": "update",
            "ica_template_path": "nets/global_templates.json",
        }
    )
    _write(out.parent / "sweep.yaml", cfg)
    with pytest.raises(UsageError, match=r"run masked-seed1: ica_template_path nets/global_templates.json not found"):
        sweep.run_sweep(path, str(out))
    assert (
        not (out / "runs").exists() and not (out / "base").exists()
    )  # refused before the base was scored or any run trained
    assert sweep.run_sweep(path, str(out), only=(0,))["trained"] == ["full-seed1"]  # runs without templates still go


# ---------------------------------------------------------------- the `networks` section


def test_networks_section_is_read_and_runs_refer_to_the_file_it_builds(tmp_path):
    (tmp_path / "ret.txt").write_text("some text\n")
    cfg = {
        "networks": {"dataset": "ret.txt", "components": 2, "samples-per-dataset": 8},
        "runs": [
            {"name": "full"},
            {"name": "masked", "mask_mode": "lesion", "ica_template_path": "networks", "ica_component_ids": "0"},
        ],
    }
    s = sweep.load(_write(tmp_path / "s.yaml", cfg))
    assert s.networks == {
        "dataset": [str(tmp_path / "ret.txt")],
        "components": 2,
        "samples_per_dataset": 8,
    }  # a list, made absolute
    out = tmp_path / "out"
    full, masked = (sweep.resolved_options(s, r, out) for r in s.runs)
    assert (
        masked["ica_template_path"] == str(out / "networks" / "global_templates.json")
        and "ica_template_path" not in full
    )
    # a run on the built networks is stale when they are rebuilt with other options; one without them is not
    assert sweep.fingerprint(s, s.runs[1], out)["train"]["networks"] == s.networks
    assert "networks" not in sweep.fingerprint(s, s.runs[0], out)["train"]
    sweep.check_inputs(s, s.runs, out)  # not built yet, but it will be before the runs: no refusal


def test_networks_section_builds_once_before_the_runs_that_use_it(tiny_llama, sft_file, tmp_path, monkeypatch):
    from fnscale.networks.templates import Templates

    (tmp_path / "retention.txt").write_text(RETENTION)
    cfg = {
        "networks": {
            "dataset": sft_file,
            "components": 2,
            "percentile": 90,
            "samples_per_dataset": 16,
            "max_seq_length": 48,
        },
        "train": {
            "model": tiny_llama,
            "dataset": sft_file,
            "validation_split": 0.0,
            "max_steps": 1,
            "batch_size": 4,
            "lora": False,
            "max_seq_length": 64,
            "learning_rate": 1e-2,
            "save_steps": 0,
            "eval_steps": 0,
            "report_to": "none",
        },
        "eval": {
            "task": sft_file,
            "task_split": "all",
            "retention": ["retention.txt"],
            "generate": 0,
            "max_seq_length": 64,
        },
        "seeds": [1],
        "runs": [
            {
                "name": "masked",
                "mask_mode": "lesion",
                "mask_effect": "update",
                "ica_template_path": "networks",
                "ica_component_ids": "0,1",
            }
        ],
    }
    path = _write(tmp_path / "sweep.yaml", cfg)
    monkeypatch.chdir(tmp_path)
    rep = sweep.run_sweep(path, "out")  # a relative output folder: runs train with their own folder as cwd
    out = tmp_path / "out"
    nets = out / "networks" / "global_templates.json"
    assert rep["trained"] == ["masked-seed1"]
    assert rep["networks"] == {
        "path": str(nets),
        "coverage": str(out / "networks" / "coverage.txt"),
        "heatmap": str(out / "networks" / "coverage.png"),
    }
    t = Templates.load(nets)
    assert t.n_components == 2 and t.percentile == 90 and t.model == Path(tiny_llama).name and t.datasets == [sft_file]
    assert (out / "networks" / "coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train = out / "runs" / "masked-seed1" / "train"
    assert json.loads((train / "summary.json").read_text())["config"]["ica_template_path"] == str(nets)
    masked = [
        json.loads(line)
        for line in (train / "metrics.jsonl").read_text().splitlines()
        if "masked_neurons/total" in line
    ]
    assert masked and masked[0]["masked_neurons/total"] > 0
    assert (
        train / "final" / "networks.json"
    ).read_bytes() == nets.read_bytes()  # what the run was masked with, beside it

    built = nets.stat().st_mtime_ns
    again = sweep.run_sweep(path, "out")
    assert (
        again["trained"] == [] and again["networks"]["path"] == str(nets) and nets.stat().st_mtime_ns == built
    )  # not rebuilt
    cfg["networks"]["components"] = 3  # other networks: the built ones (and the runs on them) are refused, not mixed in
    _write(tmp_path / "sweep.yaml", cfg)
    with pytest.raises(UsageError, match="out/networks was made with other"):
        sweep.run_sweep(path, "out")
