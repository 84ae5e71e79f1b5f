"""The sequence file of `fnscale cl`: shared `train` options, `tasks`, `orders`, `seeds` and `arms`.

    train: {learning_rate: 1.0e-4, max_steps: 100, batch_size: 4, lora: false}   # every stage starts from these
    tasks:
      - {name: countries, train: countries_train.jsonl, eval: countries_test.jsonl, metric: exact_match}
      - {name: define, train: define_train.jsonl, eval: define_test.jsonl, metric: loss}
    orders: [[countries, define], [define, countries]]   # optional; default: the tasks in file order
    seeds: [1, 2, 3]
    arms:
      - {name: sequential}
      - {name: replay, replay: 0.2}
      - {name: ewc, ewc_lambda: 1000}
      - {name: protect, protect: {components: 10, percentile: 98, max_share: 0.5}}
      - {name: protect-random, protect: {components: 10, percentile: 98}, mask_control: random}

An arm may also carry any `fnscale train` option (e.g. `lora: true`). `benchmark: {name: standard, orders: [1, 2, 3]}`
replaces `tasks` and `orders` with a registered benchmark (see fnscale.continual.benchmarks). Paths are relative to
the file. The work is a list of jobs: one per arm, seed and order (a sequence of stages), then one per single-task
reference run (the DOC convention's FWT), each addressable by `--only INDEX`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from fnscale.config import TrainConfig, keys_of, load_yaml, local_paths
from fnscale.errors import UsageError

FILE_KEYS = {
    "train",
    "tasks",
    "orders",
    "seeds",
    "arms",
    "eval",
    "launcher",
    "single_task",
    "benchmark",
    "compare",
    "keep_models",
}
TASK_KEYS = {"name", "train", "eval", "metric", "max_new_tokens", "generate"}
METRICS = ("exact_match", "label_accuracy", "token_accuracy", "loss")
METHOD_KEYS = {"name", "replay", "ewc_lambda", "ewc_samples", "protect", "mask_control"}
PROTECT_KEYS = {"components", "percentile", "samples", "max_share"}
EVAL_KEYS = {"batch_size", "max_seq_length"}
SET_BY_CL = {
    "seed",
    "output_dir",
    "dataset",
    "model",
    "gguf_file",
    "validation_dataset",
    "ica_template_path",
    "mask_mode",
    "mask_effect",
    "ica_component_ids",
    "mask_control",
    "ewc_state",
    "merge_adapter",
}


@dataclass
class Task:
    name: str
    train: str
    eval: str
    metric: str = "exact_match"
    max_new_tokens: int = 16
    generate: int | None = None  # eval examples generated from (None: all)


@dataclass
class Arm:
    name: str
    options: dict  # `fnscale train` options of this arm, on top of the file's `train`
    replay: float = 0.0
    ewc_lambda: float = 0.0
    ewc_samples: int = 64
    protect: dict | None = None
    mask_control: str = "none"

    @property
    def method_free(self) -> dict:
        """The fine-tuning options without the continual-learning method: what its single-task reference runs with."""
        return dict(sorted(self.options.items()))


@dataclass
class Job:
    index: int
    kind: str  # sequence | single
    arm: Arm
    seed: int
    order: list[str]  # task names in training order (a single-task job: one)
    order_index: int = 0
    reference: str | None = None  # single: the name of the reference family (the first arm with these options)

    @property
    def job_id(self) -> str:
        if self.kind == "single":
            return f"single-{self.reference}-{self.order[0]}-seed{self.seed}"
        return f"{self.arm.name}-seed{self.seed}-order{self.order_index + 1}"


@dataclass
class Sequence:
    path: Path
    train: dict
    tasks: dict[str, Task]
    orders: list[list[str]]
    seeds: list[int]
    arms: list[Arm]
    eval: dict = field(default_factory=dict)
    launcher: str | None = None
    single_task: bool = True
    compare: list[tuple[str, str]] = field(default_factory=list)
    keep_models: str = "last"
    benchmark: dict | None = None
    jobs: list[Job] = field(default_factory=list)

    def reference_of(self, arm: Arm) -> str:
        """The reference family of an arm: the first arm with the same fine-tuning options."""
        return next(a.name for a in self.arms if a.method_free == arm.method_free)


def _mapping(d, where: str, allowed: set[str]) -> dict:
    return keys_of(d, where, allowed, f"allowed: {', '.join(sorted(allowed))}")


def train_options(d, where: str, folder: Path) -> dict:
    d = _mapping(d, where, {f.name for f in dataclasses.fields(TrainConfig)})
    bad = sorted(set(d) & (SET_BY_CL - {"model", "gguf_file"} if where == "train" else SET_BY_CL))
    if bad:
        raise UsageError(
            f"{where}: {', '.join(bad)} cannot be set here: `fnscale cl` sets them per stage "
            "(the model belongs in `train`)"
        )
    return {k: local_paths(v, folder) for k, v in d.items()}


def _task(raw, i: int, folder: Path) -> Task:
    if not isinstance(raw, dict) or not raw.get("name") or not raw.get("train") or not raw.get("eval"):
        raise UsageError(f"tasks[{i}] needs `name`, `train` (training data) and `eval` (evaluation data)")
    raw = _mapping(raw, f"tasks[{i}] ({raw['name']})", TASK_KEYS)
    t = Task(
        **{
            **raw,
            "name": str(raw["name"]),
            "train": local_paths(raw["train"], folder),
            "eval": local_paths(raw["eval"], folder),
        }
    )
    if t.metric not in METRICS:
        raise UsageError(f"task {t.name}: metric {t.metric!r} is not one of {', '.join(METRICS)}")
    if not isinstance(t.max_new_tokens, int) or t.max_new_tokens < 1:
        raise UsageError(f"task {t.name}: max_new_tokens must be a positive integer")
    return t


def _arm(raw, i: int, folder: Path, shared: dict) -> Arm:
    if not isinstance(raw, dict) or not raw.get("name"):
        raise UsageError(f"arms[{i}] needs a `name`")
    where = f"arms[{i}] ({raw['name']})"
    raw = {str(k).replace("-", "_"): v for k, v in raw.items()}
    method = {k: v for k, v in raw.items() if k in METHOD_KEYS}
    arm = Arm(
        name=str(method.pop("name")),
        options=train_options({k: v for k, v in raw.items() if k not in METHOD_KEYS}, where, folder),
        **method,
    )
    if not 0 <= float(arm.replay) <= 10:
        raise UsageError(
            f"{where}: replay is the share of each earlier task's training data mixed in; use 0-10 (e.g. 0.2)"
        )
    if arm.ewc_lambda < 0 or (arm.ewc_lambda and {**shared, **arm.options}.get("lora", TrainConfig.lora)):
        raise UsageError(
            f"{where}: ewc_lambda must be >= 0, and EWC penalises full weights: "
            "add `lora: false` (to the arm or `train`)"
        )
    if arm.mask_control not in ("none", "random") or (arm.mask_control == "random" and not arm.protect):
        raise UsageError(
            f"{where}: mask_control random is the size-matched control of `protect`; give the arm a `protect` block too"
        )
    if arm.protect is not None:
        arm.protect = _mapping(arm.protect or {}, f"{where}.protect", PROTECT_KEYS)
        share = arm.protect.get("max_share", 0.5)
        if not 0 < share <= 1:
            raise UsageError(
                f"{where}.protect.max_share {share} must be in (0, 1]: the largest share of a layer's neurons frozen"
            )
    if sum(bool(x) for x in (arm.replay, arm.ewc_lambda, arm.protect)) > 1:
        raise UsageError(
            f"{where}: one method per arm (replay, ewc_lambda or protect), so the arms compare one thing each"
        )
    return arm


def load(path, benchmark_tasks=None) -> Sequence:
    """Read and check a sequence file. `benchmark_tasks(spec) -> (tasks, orders)` materialises a `benchmark:` block."""
    raw = _mapping(load_yaml(path), str(path), FILE_KEYS)
    folder = Path(path).resolve().parent
    seeds = raw.get("seeds", [42])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise UsageError(f"{path}: `seeds` must be a non-empty list of integers")
    if raw.get("benchmark"):
        if raw.get("tasks") or raw.get("orders"):
            raise UsageError(f"{path}: `benchmark` brings its own tasks and orders; drop `tasks`/`orders`")
        if benchmark_tasks is None:
            raise UsageError(f"{path}: this command cannot read a `benchmark` block")
        tasks_raw, orders = benchmark_tasks(raw["benchmark"], folder)
    else:
        tasks_raw, orders = raw.get("tasks"), raw.get("orders")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise UsageError(f"{path}: `tasks` must be a non-empty list of {{name, train, eval, metric}}")
    tasks = [_task(t, i, folder) for i, t in enumerate(tasks_raw)]
    by_name = {t.name: t for t in tasks}
    if len(by_name) != len(tasks):
        raise UsageError(f"{path}: task names must be unique")
    orders = orders or [[t.name for t in tasks]]
    for o in orders:
        if not isinstance(o, list) or sorted(map(str, o)) != sorted(by_name):
            raise UsageError(f"{path}: every order must list each task once ({', '.join(by_name)}); got {o}")
    shared = train_options(raw.get("train") or {}, "train", folder)
    arms = [_arm(a, i, folder, shared) for i, a in enumerate(raw.get("arms") or [{"name": "sequential"}])]
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise UsageError(f"{path}: arm names must be unique")
    compare = [tuple(map(str, p)) for p in raw.get("compare") or []]
    if any(len(p) != 2 or not set(p) <= set(names) for p in compare):
        raise UsageError(f"{path}: `compare` is a list of [ARM, ARM] pairs of arm names ({', '.join(names)})")
    if raw.get("keep_models", "last") not in ("last", "all"):
        raise UsageError(f"{path}: keep_models is `last` (delete a stage's model once the next stage is done) or `all`")
    seq = Sequence(
        Path(path),
        shared,
        by_name,
        [list(map(str, o)) for o in orders],
        seeds,
        arms,
        _mapping(raw.get("eval") or {}, "eval", EVAL_KEYS),
        raw.get("launcher"),
        bool(raw.get("single_task", True)),
        compare,
        raw.get("keep_models", "last"),
        raw.get("benchmark"),
    )
    seq.jobs = expand(seq)
    return seq


def expand(seq: Sequence) -> list[Job]:
    """Sequence jobs (arm x seed x order, in file order), then the single-task references (family x task x seed)."""
    jobs = [
        Job(0, "sequence", arm, seed, order, k)
        for arm, seed, (k, order) in itertools.product(seq.arms, seq.seeds, enumerate(seq.orders))
    ]
    if seq.single_task:
        families = list(dict.fromkeys(seq.reference_of(a) for a in seq.arms))
        arms = {a.name: a for a in seq.arms}
        for fam, task, seed in itertools.product(families, seq.tasks, seq.seeds):
            jobs.append(Job(0, "single", arms[fam], seed, [task], 0, fam))
    for i, job in enumerate(jobs):
        job.index = i
    return jobs


def fingerprint(*parts) -> dict:
    """JSON-normal form of what a result depends on (as a done-marker stores it)."""
    return json.loads(json.dumps(parts, default=str))
