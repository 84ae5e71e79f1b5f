"""The `fnscale eval` recipe: what fine-tuning gained on the task and what it cost on retention data.

`run_eval` scores the base model, then each fine-tuned variant (adapter, full model, or a continual-learning
sequence), with the token-level losses of `fnscale.eval.scoring` plus greedy generations, and hands the
figures to `fnscale.eval.report`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fnscale import data
from fnscale.config import EvalConfig, read_yaml
from fnscale.errors import UsageError
from fnscale.eval import report
from fnscale.eval.scoring import RETENTION_METRIC, RetentionCorpus, corpus_loss, corpus_names, retention_corpus
from fnscale.models import loading, placement

log = logging.getLogger(__name__)

GEN_SLACK = 8  # extra new tokens allowed beyond the reference, so a longer tokenisation is not cut short


def split_prompt(item: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, reference response ids incl. EOS) from a tokenised SFT item: the reference is the last
    assistant turn (earlier turns are prompt); empty prompt for text data."""
    labels = item["labels"]
    start = max((i + 1 for i, l in enumerate(labels) if l == data.IGNORE), default=0)
    return item["input_ids"][:start], item["input_ids"][start:]


def normalise(text: str) -> str:
    return " ".join(text.split())


def pick(n_items: int, n: int, seed: int) -> list[int]:
    """A seeded, sorted choice of n indices: the same examples for every model."""
    if n >= n_items:
        return list(range(n_items))
    return sorted(random.Random(seed).sample(range(n_items), n))


@torch.no_grad()
def greedy_scores(
    model, tokenizer, items: list[dict], batch_size: int, device, bar=None, max_new_tokens: int | None = None
) -> dict:
    """Greedy generations scored against the references.

    exact_match: whitespace-normalised decoded text equal (case-sensitive).
    token_accuracy: share of reference tokens (response + EOS) that the generation matches position-wise.
    Generation stops at EOS or at len(reference) + GEN_SLACK tokens (or at `max_new_tokens`, when given).
    """
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    pairs = [split_prompt(it) for it in items]
    pairs = [(p, r) for p, r in pairs if p and r]
    if not pairs:
        return {"exact_match": None, "token_accuracy": None, "generated": 0, "samples": []}
    was_training = model.training
    model.eval()
    matched, ref_tokens, exact, samples = 0, 0, 0, []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        width = max(len(p) for p, _ in chunk)
        # Left padding keeps every prompt's last token at the end, where generation continues.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in chunk], device=device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk], device=device)
        limit = max_new_tokens or max(len(r) for _, r in chunk) + GEN_SLACK
        cfg = GenerationConfig(max_new_tokens=limit, do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos)
        out = model.generate(input_ids=ids, attention_mask=attn, generation_config=cfg)[:, width:].tolist()
        for (p, ref), gen in zip(chunk, out):
            gen = gen[: max_new_tokens or len(ref) + GEN_SLACK]
            if eos is not None and eos in gen:
                gen = gen[: gen.index(eos) + 1]
            matched += sum(g == r for g, r in zip(gen, ref))
            ref_tokens += len(ref)
            ref_text = tokenizer.decode(ref, skip_special_tokens=True)
            gen_text = tokenizer.decode(gen, skip_special_tokens=True)
            exact += normalise(gen_text) == normalise(ref_text)
            samples.append(
                {"prompt": tokenizer.decode(p, skip_special_tokens=True), "reference": ref_text, "generation": gen_text}
            )
        if bar is not None:
            bar.update(1)
    model.train(was_training)
    return {
        "exact_match": exact / len(pairs),
        "token_accuracy": matched / ref_tokens,
        "generated": len(pairs),
        "samples": samples,
    }


# ---------------------------------------------------------------- continual learning


def load_sequence(path: str) -> list[dict]:
    """[{task, checkpoint, name}] from YAML/JSON; relative paths resolve against the file's folder first."""
    p = Path(path)
    raw = read_yaml(p, "--sequence file")
    if isinstance(raw, dict):
        raw = raw.get("sequence")
    if (
        not isinstance(raw, list)
        or not raw
        or not all(isinstance(e, dict) and "task" in e and "checkpoint" in e for e in raw)
    ):
        raise UsageError(
            f"{path}: expected a non-empty list of {{task: DATA, checkpoint: DIR}} entries in training order"
        )

    def local(value: str) -> str:
        rel = p.parent / str(value)
        return str(rel) if not Path(value).is_absolute() and rel.exists() else str(value)

    return [{"task": local(e["task"]), "checkpoint": local(e["checkpoint"]), "name": e.get("name")} for e in raw]


# ---------------------------------------------------------------- the eval workflow


@dataclass
class Variant:
    """One model to score: the base, a PEFT adapter on it, or a full fine-tuned folder."""

    label: str
    kind: str  # base | adapter | finetuned
    path: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class TaskSet:
    name: str
    source: str
    items: list[dict]
    gen_items: list[dict]


def checkpoint_kind(path: str, expected: str | None = None) -> str:
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"checkpoint folder {path} not found")
    if (p / "adapter_config.json").is_file():
        kind = "adapter"
    elif (p / "config.json").is_file():
        kind = "finetuned"
    elif expected:
        what = (
            "PEFT adapter folder (no adapter_config.json)" if expected == "adapter" else "model folder (no config.json)"
        )
        raise UsageError(f"--{expected} {path} is not a {what}; pass the folder the run saved, e.g. RUN/final")
    else:
        raise UsageError(f"{path} is neither a PEFT adapter (adapter_config.json) nor a model folder (config.json)")
    if expected == "adapter" and kind != "adapter":
        raise UsageError(
            f"--adapter {path} is not a PEFT adapter folder (no adapter_config.json); for a full model folder use "
            "--finetuned"
        )
    if expected == "finetuned" and kind != "finetuned":
        raise UsageError(f"--finetuned {path} is a PEFT adapter folder; pass it with --adapter")
    return kind


def _label(path: str, taken: list[str]) -> str:
    p = Path(path).resolve()
    generic = p.name in ("final", "merged", "adapter") or p.name.startswith("checkpoint-")
    base = f"{p.parent.name}/{p.name}" if generic and p.parent.name else p.name
    label, k = base, 2
    while label in taken:
        label, k = f"{base}#{k}", k + 1
    return label


def plan(cfg: EvalConfig) -> tuple[list[Variant], list[str]]:
    """The models and task sources to score, checked before anything heavy is loaded."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(
            "fnscale eval runs as one process on one device; run it without `accelerate launch` (training uses "
            "RetentionProbe on every rank)"
        )
    if cfg.generate < 0 or cfg.batch_size < 1 or cfg.max_seq_length < 8:
        raise UsageError("--generate must be >= 0, --batch-size >= 1 and --max-seq-length >= 8")
    if cfg.lm_eval_tasks and not lm_eval_available():
        raise UsageError(
            "--lm-eval-tasks needs the lm-eval harness: run `pip install lm-eval` (or `pip install fnscale[eval]`), or "
            "drop the flag"
        )
    variants = [Variant("base", "base")]
    taken = ["base"]
    if cfg.sequence:
        if cfg.adapter or cfg.finetuned or cfg.task:
            raise UsageError("--sequence reads tasks and checkpoints from its file; drop --task/--adapter/--finetuned")
        if cfg.generate == 0:
            raise UsageError(f"--sequence scores --cl-metric {cfg.cl_metric} from generations; set --generate above 0")
        entries = load_sequence(cfg.sequence)
        for e in entries:
            kind = checkpoint_kind(e["checkpoint"])
            label = e["name"] or _label(e["checkpoint"], taken)
            taken.append(label)
            variants.append(Variant(label, kind, e["checkpoint"]))
        return variants, [e["task"] for e in entries]
    for kind, paths in (("adapter", cfg.adapter), ("finetuned", cfg.finetuned)):
        for path in paths:
            checkpoint_kind(path, kind)
            label = _label(path, taken)
            taken.append(label)
            variants.append(Variant(label, kind, path))
    return variants, [cfg.task or str(data.default_dataset_path())]


def task_set(tokenizer, source: str, cfg: EvalConfig, name: str) -> TaskSet:
    sft = data.build_sft_data(
        tokenizer,
        source,
        cfg.max_seq_length,
        cfg.schema,
        cfg.template,
        cfg.validation_split if cfg.task_split != "all" else 0.0,
        cfg.seed,
        None,
        cfg.prompt_column,
        cfg.response_column,
        cfg.max_samples,
    )
    items = {"validation": sft.validation, "train": sft.train, "all": sft.train}[cfg.task_split]
    if not items:
        raise UsageError(
            f"task data {source}: no held-out examples with --validation-split {cfg.validation_split}; raise it or use "
            "--task-split all"
        )
    gen = [items[i] for i in pick(len(items), cfg.generate, cfg.seed)] if cfg.generate else []
    return TaskSet(name, source, items, gen)


def _training_notes(v: Variant, cfg: EvalConfig) -> list[str]:
    """Warn when the run's summary.json shows a different held-out split, so 'held out' would be false."""
    summary = Path(v.path).parent / "summary.json"
    if cfg.task_split != "validation" or not summary.is_file():
        return []
    try:
        train_cfg = json.loads(summary.read_text()).get("config", {})
    except (OSError, ValueError):
        return []
    diffs = [
        k for k in ("validation_split", "seed", "max_samples") if k in train_cfg and train_cfg[k] != getattr(cfg, k)
    ]
    if train_cfg.get("validation_dataset"):
        diffs.append("validation_dataset")
    return (
        [f"{v.label}: training used a different {', '.join(diffs)}; its held-out split differs from this one"]
        if diffs
        else []
    )


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def run_lm_eval(
    model, tokenizer, tasks: list[str], limit: int | None, batch_size: int, seed: int
) -> dict[str, dict[str, float]]:
    """Numeric metrics per lm-eval task; any harness failure (unknown task, data unreachable) is one line."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA layers are injected in place
    try:
        lm = HFLM(pretrained=inner, tokenizer=tokenizer, batch_size=batch_size)
        seeds = {"random_seed": seed, "numpy_random_seed": seed, "torch_random_seed": seed, "fewshot_random_seed": seed}
        out = simple_evaluate(model=lm, tasks=tasks, limit=limit, log_samples=False, **seeds)
    except Exception as err:  # the harness raises many kinds; the user needs the first line
        msg = (str(err).splitlines() or [""])[0][:200]
        raise UsageError(
            f"lm-eval tasks {','.join(tasks)} could not run ({type(err).__name__}: {msg}); check the task names and "
            "that their data can be downloaded"
        ) from err
    return {
        task: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for task, metrics in (out or {}).get("results", {}).items()
    }


class LoadedVariant:
    """Context manager yielding a variant's model; adapters go onto the shared base and come off after.

    PEFT's `unload()` keeps a trained copy of `modules_to_save` (e.g. lm_head) in the model, so the
    base's own module objects are put back afterwards: LoRA never writes to them unless merged.
    """

    def __init__(self, v: Variant, base, cfg: EvalConfig, dtype, device, place: dict | None = None):
        self.v, self.base, self.cfg, self.dtype, self.device, self.place = v, base, cfg, dtype, device, place
        self.model, self.originals = None, {}

    def __enter__(self):
        if self.v.kind == "base":
            self.model = self.base
        elif self.v.kind == "adapter":
            from peft import PeftModel

            self.originals = dict(self.base.named_modules())
            try:
                self.model = PeftModel.from_pretrained(self.base, self.v.path, is_trainable=False)
            except (RuntimeError, ValueError, KeyError) as err:
                self._restore()
                raise UsageError(
                    f"adapter {self.v.path} does not fit the base model: {str(err).splitlines()[0][:200]}"
                ) from err
        else:
            src = loading.ModelSource(self.v.path, self.v.label)
            self.model = load_placed(src, self.dtype, self.place, self.cfg.trust_remote_code, self.device)
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        if self.v.kind == "adapter" and self.model is not None:
            self.model.unload()
            self._restore()
        self.model = None

    def _restore(self) -> None:
        for name, module in self.originals.items():  # parents come before their children
            if name:
                parent_name, _, child = name.rpartition(".")
                parent = self.base.get_submodule(parent_name) if parent_name else self.base
                if getattr(parent, child, None) is not module:
                    setattr(parent, child, module)
        if hasattr(self.base, "peft_config"):
            del self.base.peft_config
        self.originals = {}


def load_placed(source, dtype, place: dict | None, trust_remote_code: bool, device):
    """A model on `device`, or split over devices as `place` (from --device-map auto) says; inputs then go to
    `placement.input_device`."""
    model = loading.load_model(source, dtype, None, trust_remote_code, placement=place)
    if place is None:
        return model.to(device)
    log.info("device map of %s: %s", source.display_name, placement.summary(model))
    return model


@contextmanager
def stage(desc: str, total: int):
    """A tqdm bar with an ETA on stderr for one model and data set; where stderr is not a terminal, one log line
    per stage instead (with its time), so logs and CI output stay readable."""
    start = time.time()
    with tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True, disable=None) as bar:
        yield bar
        quiet = bar.disable
    if quiet:
        log.info("%s: %d batches in %.1f s", desc, total, time.time() - start)


def score_model(
    model,
    tokenizer,
    tasks: list[TaskSet],
    retention: dict[str, RetentionCorpus],
    cfg: EvalConfig,
    device,
    label: str = "model",
) -> dict:
    pad = tokenizer.pad_token_id
    vocab = model.get_input_embeddings().num_embeddings
    if vocab < len(tokenizer):
        raise UsageError(
            f"model has {vocab} embeddings but the base tokenizer has {len(tokenizer)} tokens; fine-tuned models must "
            "share the base tokenizer"
        )
    result = {"task": {}, "retention": {}}

    def n_batches(items: list) -> int:
        return math.ceil(len(items) / cfg.batch_size)

    for t in tasks:
        torch.manual_seed(cfg.seed)
        with stage(f"{label} · task {t.name}", n_batches(t.items) + n_batches(t.gen_items)) as bar:
            scores = corpus_loss(model, t.items, cfg.batch_size, pad, device, bar)
            gen = {"exact_match": None, "token_accuracy": None, "generated": 0, "samples": []}  # nothing to generate
            if t.gen_items:
                gen = greedy_scores(model, tokenizer, t.gen_items, cfg.batch_size, device, bar)
            scores.update(gen)
        result["task"][t.name] = scores
    for name, corpus in retention.items():
        with stage(f"{label} · retention {name}", n_batches(corpus.items)) as bar:
            result["retention"][name] = corpus_loss(model, corpus.items, cfg.batch_size, pad, device, bar)
    if cfg.lm_eval_tasks:
        harness_tasks = [x.strip() for x in cfg.lm_eval_tasks.split(",") if x.strip()]
        result["lm_eval"] = run_lm_eval(model, tokenizer, harness_tasks, cfg.lm_eval_limit, cfg.batch_size, cfg.seed)
    return result


def run_eval(cfg: EvalConfig) -> dict:
    """Score the base and every variant, then write report.json/.md, the plot and TensorBoard scalars."""
    variants, task_sources = plan(cfg)
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file; pick a folder")
    place = placement.placement(cfg.device_map, cfg.max_memory, cfg.offload_folder)  # checked before anything heavy
    device = loading.pick_device(cfg.device)
    dtype = loading.resolve_dtype(cfg.dtype, device)
    source = loading.resolve_model(cfg.model, cfg.gguf_file)
    tokenizer = loading.load_tokenizer(source, cfg.trust_remote_code)
    torch.manual_seed(cfg.seed)

    task_names = corpus_names(task_sources, "sample") if cfg.sequence else ["task"]
    tasks = [task_set(tokenizer, s, cfg, n) for n, s in zip(task_names, task_sources)]
    for t in tasks if cfg.sequence else []:
        if not any(split_prompt(i)[0] for i in t.gen_items):
            raise UsageError(
                f"sequence task {t.source} is plain text (no prompts), so --cl-metric {cfg.cl_metric} cannot be scored "
                "on it"
            )
    ret_sources = (
        [] if tuple(cfg.retention) == ("none",) else list(cfg.retention or (str(data.default_retention_path()),))
    )
    retention = {
        n: retention_corpus(tokenizer, s, cfg.max_seq_length, cfg.max_samples)
        for n, s in zip(corpus_names(ret_sources), ret_sources)
    }

    base = load_placed(source, dtype, place, cfg.trust_remote_code, device)
    if place is not None:
        device = placement.input_device(base)
    results = []
    for i, v in enumerate(variants, 1):
        log.info("scoring %s (model %d of %d)", v.label, i, len(variants))
        if v.path:
            v.notes.extend(_training_notes(v, cfg))
        with LoadedVariant(v, base, cfg, dtype, device, place) as model:
            scores = score_model(model, tokenizer, tasks, retention, cfg, device, f"[{i}/{len(variants)}] {v.label}")
        results.append({"label": v.label, "kind": v.kind, "path": v.path, **scores})

    meta = {
        "model": source.display_name,
        "tasks": [
            {
                "name": t.name,
                "source": t.source,
                "split": cfg.task_split,
                "examples": len(t.items),
                "generated": len(t.gen_items),
            }
            for t in tasks
        ],
        "retention_metric": RETENTION_METRIC,
        "retention": [
            {"name": n, "source": s, "chunks": len(c.items), "scored": c.scored}
            for (n, c), s in zip(retention.items(), ret_sources)
        ],
        "notes": [n for v in variants for n in v.notes],
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k != "debug"},
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
    }
    for n in meta["notes"]:
        log.warning("%s", n)
    rep = report.build(meta, results, cfg.cl_metric if cfg.sequence else None)
    rep["files"] = report.write_all(rep, out)
    return rep
