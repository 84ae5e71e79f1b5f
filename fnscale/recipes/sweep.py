"""`fnscale sweep`: a grid of training runs over seeds, each scored by the `eval` machinery on the same data.

The YAML file names base `train` options, the `eval` options (task and retention data), `seeds`, and
`runs` (named option dicts) and/or `grid` blocks (option -> list of values, expanded as a product).
Each run trains in a subprocess (`python -m fnscale train --config RUN/config.yaml`, or under a
`launcher` such as `accelerate launch`): memory is returned to the OS between runs, a crashed run
cannot take the sweep with it, and any `train` option works in a grid, including ones added later.

A `networks` section (options of `templates build`) finds functional networks once, before the runs, into
--output/networks/; runs refer to them as `ica_template_path: networks` (see build_networks).

Layout of --output: networks/ (when built), base/ (the base model scored once), runs/NAME-seedS/ (config.yaml, train/,
eval/, done.json), then sweep.json, sweep.md and pareto.png (see fnscale.eval.sweep_report). `compare` lists
configuration pairs [A, B] whose differences A - B the report gives paired by seed, with a 95% interval.
A run with a done.json (written atomically after its eval report) is skipped on restart; one made
with other options than the file now gives is refused rather than mixed into the report.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fnscale.config import EvalConfig, TemplatesBuildConfig, TrainConfig, keys_of, load_yaml, local_paths, merge
from fnscale.errors import RunError, UsageError
from fnscale.runtime.atomic import write_json, write_text

log = logging.getLogger(__name__)

SWEEP_KEYS = {"train", "eval", "seeds", "runs", "grid", "reference", "launcher", "compare", "networks"}
SET_BY_SWEEP = {"seed", "output_dir"}  # each run's own; set per run
BASE_ONLY = {"model", "gguf_file"}  # every run must start from the base that is scored
DONE = "done.json"
NETWORKS = "networks"  # `ica_template_path: networks` names the networks the sweep's `networks` section builds


@dataclass
class Run:
    """One training run of the sweep: a named configuration at one seed."""

    index: int
    name: str
    seed: int
    options: dict  # the configuration's own options (on top of the sweep's `train` section)

    @property
    def run_id(self) -> str:
        return f"{self.name}-seed{self.seed}"


@dataclass
class Sweep:
    path: Path
    train: dict
    eval: dict
    seeds: list[int]
    configs: list[tuple[str, dict]]
    reference: str | None = None
    launcher: str | None = None
    runs: list[Run] = field(default_factory=list)
    compare: list[tuple[str, str]] = field(default_factory=list)  # configuration pairs (a, b): a - b paired by seed
    networks: dict | None = None  # `templates build` options; built once into OUTPUT/networks/


# ---------------------------------------------------------------- reading the sweep file


def _keys(d, where: str, allowed: set[str], command: str = "train") -> dict:
    return keys_of(d, where, allowed, f"see `fnscale {command} --help`", noun="option")


def _options(d, where: str, folder: Path, forbid: set[str] = frozenset()) -> dict:
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    d = _keys(d, where, train_fields)
    bad = sorted(set(d) & (SET_BY_SWEEP | forbid))
    if bad:
        raise UsageError(
            f"{where}: {', '.join(bad)} cannot be set here (the sweep sets seed and output_dir; the model belongs in "
            "`train`)"
        )
    return {k: v if (k, v) == ("ica_template_path", NETWORKS) else local_paths(v, folder) for k, v in d.items()}


def _grid_configs(blocks, folder: Path) -> list[tuple[str, dict]]:
    """Each grid block: {name: PREFIX, options: {...fixed}, axes: {option: [values]}} -> one config per product."""
    out = []
    for i, block in enumerate(blocks if isinstance(blocks, list) else [blocks]):
        where = f"grid[{i}]"
        if not isinstance(block, dict) or not isinstance(block.get("axes"), dict) or not block["axes"]:
            raise UsageError(f"{where} needs `axes`: a mapping of option to a list of values")
        fixed = _options(block.get("options") or {}, where, folder, BASE_ONLY)
        axes = _options(block["axes"], f"{where}.axes", folder, BASE_ONLY)
        if not all(isinstance(v, list) and v for v in axes.values()):
            raise UsageError(f"{where}.axes: every option needs a non-empty list of values")
        prefix = str(block.get("name", "grid"))
        for combo in itertools.product(*axes.values()):
            values = dict(zip(axes, combo))
            label = "-".join(f"{k}={_short(v)}" for k, v in values.items())
            out.append((f"{prefix}-{label}", {**fixed, **values}))
    return out


def _short(v) -> str:
    text = Path(v).stem if isinstance(v, str) and os.sep in v else str(v)
    return re.sub(r"[^\w.,=+-]+", "_", text)


def _named_configs(runs, folder: Path) -> list[tuple[str, dict]]:
    if not isinstance(runs, list):
        raise UsageError("`runs` must be a list of {name: NAME, option: value, ...}")
    out = []
    for i, r in enumerate(runs):
        if not isinstance(r, dict) or not r.get("name"):
            raise UsageError(f"runs[{i}] needs a `name`")
        opts = {k: v for k, v in r.items() if k != "name"}
        out.append((str(r["name"]), _options(opts, f"runs[{i}] ({r['name']})", folder, BASE_ONLY)))
    return out


def load(path: str | os.PathLike) -> Sweep:
    """Read and check a sweep file; runs are expanded over seeds in file order (runs, then grids)."""
    raw = _keys(load_yaml(path), str(path), SWEEP_KEYS)
    folder = Path(path).resolve().parent
    seeds = raw.get("seeds", [42])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise UsageError(f"{path}: `seeds` must be a non-empty list of integers")
    configs = _named_configs(raw.get("runs") or [], folder) + (
        _grid_configs(raw["grid"], folder) if raw.get("grid") else []
    )
    if not configs:
        raise UsageError(f"{path}: no runs; add `runs` (a list of named option sets) or a `grid`")
    names = [n for n, _ in configs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"{path}: run names must be unique; repeated: {', '.join(dupes)}")
    if raw.get("reference") and raw["reference"] not in names:
        raise UsageError(f"{path}: reference {raw['reference']!r} is not a run name; pick one of {', '.join(names)}")
    eval_opts = _keys(raw.get("eval") or {}, f"{path}: eval", {f.name for f in dataclasses.fields(EvalConfig)}, "eval")
    if {"model", "gguf_file", "adapter", "finetuned", "sequence", "output"} & set(eval_opts):
        raise UsageError(
            f"{path}: `eval` holds data and scoring options; the sweep chooses the models and the output folders"
        )
    sweep = Sweep(
        Path(path),
        _options(raw.get("train") or {}, "train", folder),
        {k: local_paths(v, folder) for k, v in eval_opts.items()},
        seeds,
        configs,
        raw.get("reference"),
        raw.get("launcher"),
    )
    sweep.runs = [Run(i, name, seed, opts) for i, ((name, opts), seed) in enumerate(itertools.product(configs, seeds))]
    sweep.compare = _compare_pairs(raw.get("compare"), names, path)
    sweep.networks = _networks_section(raw.get("networks"), path, folder, sweep)
    return sweep


def _compare_pairs(pairs, names: list[str], path) -> list[tuple[str, str]]:
    """`compare: [[A, B], ...]`: configuration pairs whose differences A - B the report gives paired by seed."""
    if pairs is None:
        return []
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise UsageError(f"{path}: `compare` must be a list of configuration pairs, e.g. [[lesion-ica, lesion-random]]")
    out = []
    for a, b in pairs:
        for name in (a, b):
            if str(name) not in names:
                raise UsageError(f"{path}: compare: {name!r} is not a configuration name; pick from {', '.join(names)}")
        if str(a) == str(b):
            raise UsageError(f"{path}: compare: [{a}, {b}] compares a configuration with itself")
        out.append((str(a), str(b)))
    return out


def _networks_section(raw, path, folder: Path, sweep: Sweep) -> dict | None:
    """The `networks` section's `templates build` options (the sweep sets model and output); refs to it are checked."""
    users = [r.run_id for r in sweep.runs if _uses_networks({**sweep.train, **r.options})]
    if raw is None:
        if users:
            raise UsageError(
                f"{path}: run {users[0]} has ica_template_path: {NETWORKS}, which names the networks a `networks` "
                "section builds; add one (options of `fnscale templates build`) or give a templates JSON path"
            )
        return None
    opts = _keys(
        raw, f"{path}: networks", {f.name for f in dataclasses.fields(TemplatesBuildConfig)}, "templates build"
    )
    if {"model", "gguf_file", "output"} & set(opts):
        raise UsageError(
            f"{path}: networks: model, gguf_file and output are the sweep's (the base model of `train`, "
            f"OUTPUT/{NETWORKS}/); remove them"
        )
    if isinstance(opts.get("dataset"), str):
        opts["dataset"] = [opts["dataset"]]
    return {k: local_paths(v, folder) for k, v in opts.items()}


def _uses_networks(opts: dict) -> bool:
    return opts.get("ica_template_path") == NETWORKS


# ---------------------------------------------------------------- one run


def run_dir(out: Path, run: Run) -> Path:
    return out / "runs" / run.run_id


def resolved_options(sweep: Sweep, run: Run, out: Path) -> dict:
    """The run's full `train` options; LoRA runs also save the merged model, which is what eval scores."""
    opts = {
        "resume_from_checkpoint": "auto",
        **sweep.train,
        **run.options,
        "seed": run.seed,
        "output_dir": str(run_dir(out, run) / "train"),
    }
    if _uses_networks(opts):
        opts["ica_template_path"] = str(networks_file(out))
    if opts.get("lora", TrainConfig.lora):
        opts["merge_adapter"] = True
    return opts


def trained_model(opts: dict) -> Path:
    train_dir = Path(opts["output_dir"])
    return train_dir / ("merged" if opts.get("lora", TrainConfig.lora) else "final")


def train_command(sweep: Sweep, config_file: Path) -> list[str]:
    prefix = shlex.split(sweep.launcher) if sweep.launcher else [sys.executable]
    return [*prefix, "-m", "fnscale", "train", "--config", str(config_file)]


def train_run(sweep: Sweep, run: Run, out: Path) -> dict:
    """Train one run in a subprocess (output in RUN/train.log) unless its summary.json shows it finished."""
    folder = run_dir(out, run)
    opts = resolved_options(sweep, run, out)
    summary = Path(opts["output_dir"]) / "summary.json"
    if summary.is_file() and trained_model(opts).is_dir():
        return opts
    write_text(folder / "config.yaml", yaml.safe_dump(opts, sort_keys=False))
    cmd = train_command(sweep, folder / "config.yaml")
    log.info("training %s: %s", run.run_id, shlex.join(cmd))
    with open(folder / "train.log", "ab") as logfile:
        code = subprocess.call(
            cmd, cwd=folder, stdout=logfile, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    if code != 0:
        log_file = folder / "train.log"
        raise RunError(
            f"run {run.run_id} failed (exit {code}): {_last_error(log_file)}; see {log_file}, fix and rerun (finished "
            "runs are kept)"
        )
    if not trained_model(opts).is_dir():
        raise RunError(
            f"run {run.run_id} finished without a model in {trained_model(opts)} (stopped by a signal?); rerun the "
            "sweep to resume it"
        )
    return opts


def _last_error(logfile: Path) -> str:
    lines = [ln.strip() for ln in logfile.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
    return (errors or lines or ["no output"])[-1][:300]


def score(sweep: Sweep, model: str | None, gguf_file: str | None, output: Path) -> dict:
    """Task loss and retention perplexity of one model, via `fnscale eval`'s run_eval (it scores --model only)."""
    from fnscale.recipes.evaluate import run_eval

    chosen = {"model": model, "gguf_file": gguf_file, "output": str(output)}  # load() keeps these out of sweep.eval
    rep = run_eval(merge(EvalConfig, sweep.eval, chosen, set(chosen), "eval"))
    scores = rep["models"][0]
    return {
        "task_loss": {name: s["loss"] for name, s in scores["task"].items()},
        "retention_ppl": {name: s["ppl"] for name, s in scores["retention"].items()},
        "retention_metric": rep["retention_metric"],
        "report": rep["files"]["json"],
    }


def read_done(folder: Path) -> dict | None:
    path = folder / DONE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None  # a marker that cannot be read counts as not done


def fingerprint(sweep: Sweep, run: Run | None, out: Path) -> dict:
    """What a result depends on: the run's resolved train options (not its folder) or the base model, and the eval
    options."""
    if run is None:
        train = {k: sweep.train.get(k) for k in sorted(BASE_ONLY)}
    else:
        train = {k: v for k, v in resolved_options(sweep, run, out).items() if k != "output_dir"}
        if _uses_networks({**sweep.train, **run.options}):
            train["networks"] = sweep.networks  # networks rebuilt with other options make the run stale
    return json.loads(json.dumps({"train": train, "eval": sweep.eval}))  # as done.json stores it


def done_with(folder: Path, expected: dict, options: str) -> dict | None:
    """The done-marker of a result made with the expected options; one made with other `options` is refused."""
    done = read_done(folder)
    if done is not None and done.get("config") != expected:
        raise UsageError(f"{folder} was made with other {options} now gives; remove it or pick another --output")
    return done


def finished(folder: Path, expected: dict) -> dict | None:
    """The done-marker of a scored result made with the expected options and the current retention metric."""
    done = done_with(folder, expected, "train or eval options than the sweep file")
    from fnscale.eval.scoring import RETENTION_METRIC

    if done is not None and done.get("retention_metric") != RETENTION_METRIC:  # figures of two metrics must not mix
        old = done.get("retention_metric", "retention/1")
        raise UsageError(
            f"{folder} was scored with an older retention metric ({old}, now {RETENTION_METRIC}); "
            "remove it or pick another --output to score it again"
        )
    return done


def execute(sweep: Sweep, run: Run, out: Path) -> bool:
    """Train and score one run unless it is finished; True when it did work."""
    folder = run_dir(out, run)
    expected = fingerprint(sweep, run, out)
    if finished(folder, expected) is not None:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    opts = train_run(sweep, run, out)
    scores = score(sweep, str(trained_model(opts)), None, folder / "eval")
    summary = json.loads((Path(opts["output_dir"]) / "summary.json").read_text())
    train_facts = {k: summary.get(k) for k in ("steps", "final_loss", "eval_loss", "train_time_s")}
    marker = {
        "run": run.run_id,
        "name": run.name,
        "seed": run.seed,
        "options": run.options,
        "config": expected,
        "train": train_facts,
        **scores,
    }
    write_json(folder / DONE, marker)
    return True


def score_base(sweep: Sweep, out: Path) -> dict:
    """The base model's scores, computed once and kept in base/done.json."""
    expected = fingerprint(sweep, None, out)
    done = finished(out / "base", expected)
    if done is None:
        log.info("scoring the base model")
        scores = score(sweep, sweep.train.get("model"), sweep.train.get("gguf_file"), out / "base" / "eval")
        done = {"run": "base", "config": expected, **scores}
        write_json(out / "base" / DONE, done)
    return done


def networks_file(out: Path) -> Path:
    return out / NETWORKS / "global_templates.json"


def build_networks(sweep: Sweep, out: Path) -> dict:
    """The `networks` section: `templates build` once, in this process, into OUTPUT/networks/ (global_templates.json,
    coverage.txt, coverage.png); skipped when its done.json shows it was built with the same options."""
    from fnscale.recipes.build_networks import run_build

    folder = out / NETWORKS
    expected = json.loads(
        json.dumps({"model": {k: sweep.train.get(k) for k in sorted(BASE_ONLY)}, "networks": sweep.networks})
    )
    done = done_with(folder, expected, "networks options than the sweep file")  # no retention metric here
    if done is None:
        log.info("finding the functional networks (templates build) into %s", folder)
        chosen = {"model": sweep.train.get("model"), "gguf_file": sweep.train.get("gguf_file"), "output": str(folder)}
        res = run_build(merge(TemplatesBuildConfig, sweep.networks, chosen, set(chosen), "templates build"))
        files = {k: res[k] for k in ("path", "coverage", "heatmap")}
        done = {"run": NETWORKS, "config": expected, "files": files}
        write_json(folder / DONE, done)
    return done


def _networks_needed(sweep: Sweep, chosen: list[Run], whole: bool) -> bool:
    """Build for a whole sweep (its networks are part of the result), or for `--only` runs that use them."""
    if sweep.networks is None or not chosen:
        return False
    return whole or any(_uses_networks({**sweep.train, **r.options}) for r in chosen)


# ---------------------------------------------------------------- the sweep


def listing(sweep: Sweep) -> list[str]:
    """One line per run, `INDEX<TAB>RUN_ID<TAB>options`: what `--only INDEX` picks (SLURM array task ids)."""
    own = "(the sweep's train options)"
    return [f"{r.index}\t{r.run_id}\t{' '.join(f'{k}={v}' for k, v in r.options.items()) or own}" for r in sweep.runs]


def check_inputs(sweep: Sweep, runs: list[Run], out: Path) -> None:
    """Refuse up front a run whose templates file is missing: otherwise it fails only after the runs before it
    trained."""
    for run in runs:
        path = resolved_options(sweep, run, out).get("ica_template_path")
        built = sweep.networks is not None and path == str(networks_file(out))  # built before the runs
        if path and not built and not Path(path).is_file() and read_done(run_dir(out, run)) is None:
            raise UsageError(
                f"run {run.run_id}: ica_template_path {path} not found (relative paths are taken from the sweep "
                "file's folder); build it first with `fnscale templates build ... --output FOLDER`"
            )


def run_sweep(path: str, output: str, only: tuple[int, ...] = (), report_only: bool = False) -> dict:
    """Run (or with `only`, part of) the sweep, then write the report; returns {trained, skipped, report}."""
    from fnscale.eval import sweep_report

    sweep = load(path)
    out = Path(output).absolute()  # runs train with their own folder as cwd
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file; pick a folder")
    bad = [i for i in only if not 0 <= i < len(sweep.runs)]
    if bad:
        raise UsageError(
            f"--only {bad[0]}: the sweep has runs 0-{len(sweep.runs) - 1}; see `fnscale sweep {path} --list`"
        )
    if only and report_only:
        raise UsageError("--only runs single runs and --report-only only reports; pass one of them")
    chosen = [] if report_only else [sweep.runs[i] for i in only] if only else sweep.runs
    check_inputs(sweep, chosen, out)
    trained, skipped = [], []
    networks = build_networks(sweep, out) if _networks_needed(sweep, chosen, whole=not only) else None
    base = None if only else score_base(sweep, out)  # before the runs, so a broken eval setup fails before any training
    for k, run in enumerate(chosen, 1):
        log.info("[%d/%d] %s", k, len(chosen), run.run_id)
        (trained if execute(sweep, run, out) else skipped).append(run.run_id)
    result = {"trained": trained, "skipped": skipped, "report": None}
    if networks is not None:
        result["networks"] = networks["files"]
    if not only:
        done = {r.run_id: read_done(run_dir(out, r)) for r in sweep.runs}
        result["report"] = sweep_report.write_all(sweep, base, done, out)
    return result
