"""`fnscale cl SEQUENCE.yaml --output DIR`: train tasks one after another and score every task after every stage.

Each stage is one `fnscale train` subprocess (as `sweep` runs them: memory returns to the OS, a crash stays in its
stage, `--resume-from-checkpoint auto` continues a stage that was stopped mid-way) starting from the previous stage's
weights. LoRA arms merge each stage's adapter into the weights the next stage starts from (one model per stage, so
the matrix scores what a user would deploy). After training, the stage's model is scored on every task of the
sequence (task loss on its eval data; greedy generations for the accuracy metrics, with each task's max_new_tokens),
then the arm's method runs: EWC estimates the task's Fisher, protect-as-you-go finds the task's networks and grows the
frozen set. A done.json per stage (written last, atomically) makes every finished stage a restart point.

Layout of --output: base/ (the base model scored once), first/TASK-seedS-HASH/ (first stages, shared by every job
that trains one alike: config.yaml, train.log, train/, done.json), runs/ARM-seedS-orderK/stageN-TASK/ (config.yaml,
train.log, train/, networks/, protected.json, fisher.safetensors, done.json), single/ (single-task references), data/
(a benchmark's files), then cl.json, cl.md and the figures (see fnscale.continual.report).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from fnscale.config import EvalConfig, TrainConfig
from fnscale.continual import benchmarks, protect, report, spec
from fnscale.continual.spec import Job, Sequence
from fnscale.errors import RunError, UsageError
from fnscale.recipes.sweep import DONE, _last_error, done_with, read_done, train_command, trained_model
from fnscale.runtime.atomic import write_json, write_text

log = logging.getLogger(__name__)

SCORE_KEYS = ("schema", "template", "prompt_column", "response_column", "max_seq_length")


def load(path: str, out: Path | None) -> Sequence:
    """The sequence file; a `benchmark` block's data are written to OUT/data (not when only listing, out=None)."""
    return spec.load(
        path, lambda b, folder: benchmarks.materialise(b, folder, out / "data" if out is not None else None)
    )


def listing(seq: Sequence) -> list[str]:
    """One line per job, `INDEX<TAB>JOB_ID<TAB>what`: what `--only INDEX` picks (SLURM array task ids)."""
    return [f"{j.index}\t{j.job_id}\t{j.kind}: {' -> '.join(j.order)}" for j in seq.jobs]


# ---------------------------------------------------------------- one stage


def job_dir(out: Path, job: Job) -> Path:
    return out / ("single" if job.kind == "single" else "runs") / job.job_id


def stage_dir(out: Path, job: Job, k: int) -> Path:
    return job_dir(out, job) / f"stage{k + 1}-{job.order[k]}"


def stage_options(seq: Sequence, job: Job, k: int, folder: Path, prev_model: str | None, prev: dict | None) -> dict:
    """The `fnscale train` options of stage k: shared, the arm's, then what the sequence sets (model, data, method)."""
    arm, task = job.arm, seq.tasks[job.order[k]]
    opts = {
        "resume_from_checkpoint": "auto",
        "validation_split": 0.0,
        "eval_steps": 0,
        "report_to": "none",
        **seq.train,
        **arm.options,
        "seed": job.seed,
        "output_dir": str(folder / "train"),
    }
    if prev_model:
        opts["model"] = prev_model
        opts.pop("gguf_file", None)
    method = job.kind == "sequence" and k > 0
    replayed = [f"{seq.tasks[t].train}:{arm.replay:g}" for t in job.order[:k]] if method and arm.replay else []
    opts["dataset"] = [task.train, *replayed]
    if opts.get("lora", TrainConfig.lora):
        opts["merge_adapter"] = True
    if method and arm.ewc_lambda:
        opts.update(ewc_state=prev["ewc_state"], ewc_lambda=float(arm.ewc_lambda))
    if method and arm.protect:
        opts.update(
            ica_template_path=prev["protected"], mask_mode="lesion", mask_effect="update", ica_component_ids="0"
        )
    return opts


def train_stage(seq: Sequence, opts: dict, folder: Path, label: str) -> Path:
    """One `fnscale train` subprocess (output in STAGE/train.log) unless it finished before; the model folder."""
    model = trained_model(opts)
    if (Path(opts["output_dir"]) / "summary.json").is_file() and model.is_dir():
        return model
    write_text(folder / "config.yaml", yaml.safe_dump(opts, sort_keys=False))
    cmd = train_command(seq, folder / "config.yaml")
    log.info("training %s: %s", label, shlex.join(cmd))
    code = _call(cmd, folder, folder / "train.log")
    if code != 0:
        raise RunError(
            f"{label} failed (exit {code}): {_last_error(folder / 'train.log')}; "
            f"see {folder / 'train.log'}, fix and rerun"
        )
    if not model.is_dir():
        raise RunError(f"{label} finished without a model in {model} (stopped by a signal?); rerun to resume it")
    return model


def _call(cmd: list[str], cwd: Path, logfile: Path) -> int:
    with open(logfile, "ab") as fh:
        return subprocess.call(
            cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )


def score_options(seq: Sequence) -> dict:
    """What scoring depends on: the data-shape options of training and the `eval` section."""
    return {**{k: seq.train[k] for k in SCORE_KEYS if k in seq.train}, **seq.eval}


def score(seq: Sequence, model: str | None, names: list[str], gguf_file: str | None = None) -> dict:
    """Every named task scored by the `eval` machinery: task loss, and greedy generations for accuracy metrics."""
    import torch

    from fnscale.eval.scoring import corpus_loss
    from fnscale.models import loading
    from fnscale.recipes.evaluate import greedy_scores, load_placed, task_set

    opts = score_options(seq)
    cfg = EvalConfig(
        task_split="all",
        generate=0,
        batch_size=opts.get("batch_size", 16),
        max_seq_length=opts.get("max_seq_length", 256),
        **{k: opts[k] for k in ("schema", "template", "prompt_column", "response_column") if k in opts},
    )
    base = loading.resolve_model(seq.train.get("model"), seq.train.get("gguf_file"))
    tokenizer = loading.load_tokenizer(base, seq.train.get("trust_remote_code", False))
    device = loading.pick_device("auto")
    source = loading.resolve_model(model, gguf_file)
    net = load_placed(
        source, loading.resolve_dtype("auto", device), None, seq.train.get("trust_remote_code", False), device
    )
    out = {}
    for name in names:
        task = seq.tasks[name]
        ts = task_set(tokenizer, task.eval, cfg, name)
        torch.manual_seed(0)
        scores = {"loss": corpus_loss(net, ts.items, cfg.batch_size, tokenizer.pad_token_id, device)["loss"]}
        if task.metric != "loss":
            chosen = ts.items[: task.generate] if task.generate else ts.items
            gen = greedy_scores(net, tokenizer, chosen, cfg.batch_size, device, max_new_tokens=task.max_new_tokens)
            scores.update(
                exact_match=gen["exact_match"],
                token_accuracy=gen["token_accuracy"],
                generated=gen["generated"],
                label_accuracy=report.label_accuracy(gen["samples"]),
                samples=gen["samples"][:5],
            )
        out[name] = scores
    return out


def after_stage(seq: Sequence, job: Job, k: int, folder: Path, model: Path, prev: dict | None) -> dict:
    """The arm's method after stage k (not after the last): EWC's accumulated Fisher, protect's grown frozen set."""
    arm, task = job.arm, seq.tasks[job.order[k]]
    if job.kind != "sequence" or k == len(job.order) - 1:
        return {}
    if arm.ewc_lambda:
        return {
            "ewc_state": str(
                fisher_after(seq, arm, task, model, folder, (prev or {}).get("ewc_state"), job.order[: k + 1])
            )
        }
    if arm.protect:
        return protect_after(seq, job, k, folder, model, prev)
    return {}


def fisher_after(seq: Sequence, arm, task, model: Path, folder: Path, previous: str | None, tasks: list[str]) -> Path:
    from fnscale import data
    from fnscale.continual import ewc
    from fnscale.models import loading

    source = loading.ModelSource(str(model), model.name)
    tokenizer = loading.load_tokenizer(source)
    device = loading.pick_device("auto")
    net = loading.load_model(source, loading.resolve_dtype("float32", device)).to(device)
    o = {**seq.train, **arm.options}
    sft = data.build_sft_data(
        tokenizer,
        task.train,
        o.get("max_seq_length", TrainConfig.max_seq_length),
        o.get("schema", "auto"),
        o.get("template", "auto"),
        0.0,
        0,
        None,
        o.get("prompt_column"),
        o.get("response_column"),
    )
    fisher = ewc.fisher_diagonal(net, sft.train, tokenizer.pad_token_id, device, arm.ewc_samples)
    return ewc.save_state(folder / "fisher.safetensors", ewc.accumulate(fisher, previous), model, tasks)


def protect_after(seq: Sequence, job: Job, k: int, folder: Path, model: Path, prev: dict | None) -> dict:
    """Networks of task k on the stage-k model (`fnscale templates build`), added to the frozen set (capped)."""
    import numpy as np

    from fnscale.networks.templates import Templates

    p, task = job.arm.protect, seq.tasks[job.order[k]]
    cmd = [
        sys.executable,
        "-m",
        "fnscale",
        "templates",
        "build",
        "--model",
        str(model),
        "--dataset",
        task.train,
        "--components",
        str(p.get("components", 10)),
        "--percentile",
        str(p.get("percentile", 98.0)),
        "--samples-per-dataset",
        str(p.get("samples", 64)),
        "--seed",
        str(job.seed),
        "--output",
        str(folder / "networks"),
        "--max-seq-length",
        str(seq.train.get("max_seq_length", TrainConfig.max_seq_length)),
    ]
    if not (folder / "networks" / "global_templates.json").is_file():
        if _call(cmd, folder, folder / "networks.log") != 0:
            raise RunError(
                f"finding networks after {folder.name} failed: {_last_error(folder / 'networks.log')}; "
                f"see {folder / 'networks.log'}"
            )
    found = Templates.load(folder / "networks" / "global_templates.json")
    before = Templates.load(prev["protected"]).components if prev and prev.get("protected") else {0: {}, 1: {}}
    control = job.arm.mask_control == "random"
    grown, seen = protect.grow(
        before[0],
        before[1],
        protect.found_neurons(found),
        found.neurons_per_layer,
        p.get("max_share", 0.5),
        job.seed * 1000 + k,
        control,
    )
    note = f"protected after {' -> '.join(job.order[: k + 1])}" + (" (random control)" if control else "")
    path = protect.as_templates(grown, seen, found, note).save(folder / "protected.json")
    frozen = protect.share(grown, len(found.layers), found.neurons_per_layer)
    log.info("%s: %.1f%% of MLP neurons frozen for later stages", note, 100 * frozen)
    return {
        "protected": str(path),
        "frozen_share": frozen,
        "found": int(sum(np.size(v) for v in protect.found_neurons(found).values())),
    }


# ---------------------------------------------------------------- jobs


def run_job(seq: Sequence, job: Job, out: Path) -> bool:
    """Every stage of a job that is not done yet; True when it did work."""
    prev_model, prev, worked = seq.train.get("model"), None, False
    names = list(seq.tasks) if job.kind == "sequence" else job.order
    for k in range(len(job.order)):
        folder = stage_dir(out, job, k)
        opts = stage_options(seq, job, k, folder, prev_model, prev)
        expected = spec.fingerprint(
            {k_: v for k_, v in opts.items() if k_ != "output_dir"},
            score_options(seq),
            job.arm.protect,
            job.arm.mask_control,
            job.arm.ewc_samples,
            [vars(seq.tasks[n]) for n in names],
        )
        done = finished(folder, expected)
        if done is None:
            folder.mkdir(parents=True, exist_ok=True)
            label = f"{job.job_id} stage {k + 1} ({job.order[k]})"
            if k == 0:
                model, scores = first_stage(seq, opts, names, out / "first" / f"{job.order[0]}-seed{job.seed}", label)
            else:
                model = train_stage(seq, opts, folder, label)
                scores = score(seq, str(model), names)
            post = after_stage(seq, job, k, folder, model, prev)
            done = {
                "job": job.job_id,
                "stage": k,
                "task": job.order[k],
                "model": str(model),
                "config": expected,
                "scores": scores,
                **post,
            }
            write_json(folder / DONE, done)
            _drop_checkpoints(Path(opts["output_dir"]))
            if k and seq.keep_models == "last" and job.kind == "sequence":
                _drop_model(stage_dir(out, job, k - 1))
            worked = True
        prev_model, prev = done["model"], done
    return worked


def first_stage(seq: Sequence, opts: dict, names: list[str], prefix: Path, label: str) -> tuple[Path, dict]:
    """A stage that starts from the base model, trained and scored once for every job that trains it alike.

    Arms differ from stage 2 on (their methods act on what earlier stages learned), and a task's single-task
    reference is the first stage of a sequence that starts with it, so most first stages are the same training. The
    shared one lives in OUT/first/TASK-seedS-HASH (HASH: of its options) and is kept; a lock makes parallel `--only`
    jobs wait for it rather than train it twice. Returns its model and the named tasks' scores.
    """
    options = {k: v for k, v in opts.items() if k != "output_dir"}
    expected = spec.fingerprint(options, score_options(seq), [vars(t) for t in seq.tasks.values()])
    digest = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:10]
    folder = prefix.with_name(f"{prefix.name}-{digest}")
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".lock"):
        done = finished(folder, expected) or {"job": folder.name, "config": expected, "scores": {}}
        missing = [n for n in names if n not in done["scores"]]
        if missing:
            if done["scores"]:
                log.info("%s: the shared first stage %s is trained; scoring %s", label, folder.name, missing)
            opts = {**opts, "output_dir": str(folder / "train")}
            model = train_stage(seq, opts, folder, label)  # returns at once when trained before
            done.update(model=str(model), scores={**done["scores"], **score(seq, str(model), missing)})
            write_json(folder / DONE, done)
            _drop_checkpoints(folder / "train")
        else:
            log.info("%s: reusing the shared first stage %s", label, folder.name)
    return Path(done["model"]), {n: done["scores"][n] for n in names}


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on PATH (flock: released when the process ends, however it ends)."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def finished(folder: Path, expected: dict) -> dict | None:
    """The stage's done-marker if made with the expected options; one made with others is refused, not mixed in."""
    return done_with(folder, expected, "options than the sequence file")


def _drop_checkpoints(train_dir: Path) -> None:
    """A finished stage's checkpoints: they only serve to resume it."""
    for ckpt in train_dir.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)


def _drop_model(folder: Path) -> None:
    """The previous stage's weights once the next stage is done (keep_models: last): they are no longer read."""
    for name in ("final", "merged"):
        shutil.rmtree(folder / "train" / name, ignore_errors=True)


def score_base(seq: Sequence, out: Path) -> dict:
    """The base model's scores on every task, computed once and kept in base/done.json."""
    expected = spec.fingerprint(
        {k: seq.train.get(k) for k in ("model", "gguf_file")}, score_options(seq), [vars(t) for t in seq.tasks.values()]
    )
    done = finished(out / "base", expected)
    if done is None:
        log.info("scoring the base model")
        scores = score(seq, seq.train.get("model"), list(seq.tasks), seq.train.get("gguf_file"))
        done = {"job": "base", "config": expected, "scores": scores}
        write_json(out / "base" / DONE, done)
    return done


def collect(seq: Sequence, out: Path) -> dict:
    """Every stage marker on disk, by job id (stages in order; missing stages are None)."""
    return {j.job_id: [read_done(stage_dir(out, j, k)) for k in range(len(j.order))] for j in seq.jobs}


def run_cl(path: str, output: str, only: tuple[int, ...] = (), report_only: bool = False) -> dict:
    """Run (or with `only`, part of) the sequence's jobs, then write the report; returns {trained, skipped, report}."""
    out = Path(output).absolute()  # stages train with their own folder as cwd
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file; pick a folder")
    seq = load(path, out)
    bad = [i for i in only if not 0 <= i < len(seq.jobs)]
    if bad:
        raise UsageError(
            f"--only {bad[0]}: the sequence has jobs 0-{len(seq.jobs) - 1}; see `fnscale cl {path} --list`"
        )
    if only and report_only:
        raise UsageError("--only runs single jobs and --report-only only reports; pass one of them")
    chosen = [] if report_only else [seq.jobs[i] for i in only] if only else seq.jobs
    base = None if only else score_base(seq, out)  # first, so a broken scoring setup fails before any training
    trained, skipped = [], []
    for n, job in enumerate(chosen, 1):
        log.info("[%d/%d] %s", n, len(chosen), job.job_id)
        (trained if run_job(seq, job, out) else skipped).append(job.job_id)
    result = {"trained": trained, "skipped": skipped, "report": None}
    if not only:
        result["report"] = report.write_all(seq, base, collect(seq, out), out)
    return result
