"""Forgetting measurement: what fine-tuning gained on the task and what it cost on retention data.

All losses are token means (summed NLL over scored tokens / their count), so corpora of any length
compare, and per-rank sums add up exactly under Accelerate. `RetentionProbe` is the piece training
uses; `run_eval` is the `fnscale eval` workflow (base model, then each fine-tuned variant).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fnscale import data, models
from fnscale.config import opt
from fnscale.errors import UsageError

log = logging.getLogger(__name__)

NO_LIMIT = 10**9  # a max_len that never truncates (chunking happens afterwards)
GEN_SLACK = 8  # extra new tokens allowed beyond the reference, so a longer tokenisation is not cut short
CL_METRICS = ("token_accuracy", "exact_match")


@dataclass
class EvalConfig:
    # models
    model: str | None = opt(None, "base model: HF id, local folder or .gguf file; default: the embedded SmolLM2-135M-Instruct")
    gguf_file: str | None = opt(None, "GGUF file name inside --model (a folder or hub repo); default: none")
    adapter: tuple[str, ...] = opt((), "PEFT adapter folder to load onto the base model; default: none")
    finetuned: tuple[str, ...] = opt((), "full fine-tuned model folder (same tokenizer as the base); default: none")
    sequence: str | None = opt(None, "continual-learning run: YAML/JSON list of {task, checkpoint} in training order; replaces --task/--adapter/--finetuned; default: none")
    # task data
    task: str | None = opt(None, "task data: file, folder or glob (.json/.jsonl/.csv/.parquet, .gz too) or hub NAME[:CONFIG[:SPLIT]]; default: the bundled sample data")
    task_split: str = opt("validation", "task examples scored: validation (held out as training split it), train, or all", ["validation", "train", "all"])
    validation_split: float = opt(0.05, "held-out share, as in training (must match the training run's to be held out)")
    schema: str = opt("auto", "column schema of the task data", list(data.SCHEMAS))
    template: str = opt("auto", "prompt format (as in training)", ["auto", "chat", "plain"])
    prompt_column: str | None = opt(None, "custom prompt column(s), comma-separated ones joined (with --response-column); default: from --schema")
    response_column: str | None = opt(None, "custom response column (with --prompt-column); default: from --schema")
    max_samples: int | None = opt(None, "use only the first N records of each data file; default: all")
    # retention
    retention: tuple[str, ...] = opt((), "retention corpus (.txt, data with a `text` column, or SFT data: all tokens scored); default: the bundled retention.txt; `none` skips")
    # generation
    generate: int = opt(32, "greedy generations per task scored for exact match and token accuracy (0: none)")
    cl_metric: str = opt("token_accuracy", "score in the continual-learning matrix R", list(CL_METRICS))
    lm_eval_tasks: str | None = opt(None, "comma-separated lm-eval harness tasks (needs `pip install lm-eval` and reachable data); default: none")
    lm_eval_limit: int | None = opt(None, "examples per lm-eval task; default: all")
    # runtime
    max_seq_length: int = opt(512, "truncate task examples (keeping the response) and chunk retention text to this many tokens")
    batch_size: int = opt(8, "sequences per forward pass")
    seed: int = opt(42, "seed for the held-out split and the choice of generated examples")
    dtype: str = opt("auto", "weights dtype (auto: bf16 on CUDA, fp16 on MPS, fp32 on CPU)", ["auto", "float32", "bfloat16", "float16"])
    device: str = opt("auto", "device (auto: CUDA > MPS > CPU), e.g. cpu or cuda:1")
    trust_remote_code: bool = opt(False, "allow custom model code from the hub (off by default: it runs arbitrary code)")
    output: str = opt("runs/eval", "folder for report.json, report.md, the plot and TensorBoard scalars")
    debug: bool = opt(False, "show tracebacks")


# ---------------------------------------------------------------- token-level loss


def batches(items: list[dict], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [data.collate(items[i : i + batch_size], pad_id) for i in range(0, len(items), batch_size)]


@torch.no_grad()
def nll_sum(model, batch: dict[str, torch.Tensor], device) -> tuple[float, int]:
    """Summed next-token NLL over labelled positions, and their count (only scored positions hit the softmax)."""
    ids, attn, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    target = labels[:, 1:]
    keep = target != data.IGNORE
    if not keep.any():
        return 0.0, 0
    nll = torch.nn.functional.cross_entropy(logits[keep].float(), target[keep], reduction="sum")
    return float(nll.double()), int(keep.sum())


def shard_sums(model, bs: list[dict], rank: int, world: int, device) -> tuple[float, int, int]:
    """This rank's share (batches rank, rank+world, ...) as (NLL sum, tokens, forward calls).

    Every rank makes the same number of forward calls (a short shard repeats batch 0 and discards
    it), because under ZeRO-3 each forward gathers parameters collectively and would hang otherwise.
    """
    calls = math.ceil(len(bs) / world)
    mine = bs[rank::world]
    total, count = 0.0, 0
    for i in range(calls):
        if i < len(mine):
            s, c = nll_sum(model, mine[i], device)
            total, count = total + s, count + c
        else:
            nll_sum(model, bs[0], device)
    return total, count, calls


def loss_stats(total: float, count: int) -> dict:
    loss = total / count if count else float("nan")
    return {"loss": loss, "ppl": perplexity(loss), "tokens": count}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def corpus_loss(model, items: list[dict], batch_size: int, pad_id: int, device) -> dict:
    """Mean NLL per scored token, its perplexity and the token count, on one process."""
    was_training = model.training
    model.eval()
    total, count, _ = shard_sums(model, batches(items, batch_size, pad_id), 0, 1, device)
    model.train(was_training)
    return loss_stats(total, count)


# ---------------------------------------------------------------- retention corpora


def retention_items(tokenizer, source: str, max_len: int, max_samples: int | None = None) -> list[dict]:
    """Every token of the corpus scored, in non-overlapping windows of max_len (long texts are chunked, not cut).

    Plain text and `text` columns are read as text; SFT data is rendered as prompt + response.
    """
    path = data.default_retention_path() if source in ("", "default") else source
    records = data.load_records(str(path))[: max_samples or None]
    items = []
    for ex in data.to_examples(records):
        tok = data.tokenize_example(tokenizer, ex, NO_LIMIT)
        if tok is None:
            continue
        ids = tok["input_ids"]
        for start in range(0, len(ids), max_len):
            chunk = ids[start : start + max_len]
            if len(chunk) > 1:
                items.append({"input_ids": chunk, "labels": list(chunk)})
    if not items:
        raise UsageError(f"retention data {source} has no text to score")
    return items


def corpus_names(sources, default_name: str = "retention") -> list[str]:
    """Short unique names (file stems) for metric keys and tables."""
    names = []
    for s in sources:
        base = default_name if s in ("", "default") else re.sub(r"[^\w.-]+", "_", Path(s).stem or s)
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


class RetentionProbe:
    """Perplexity on retention corpora during training, correct under DDP and ZeRO-3.

    Batches are dealt round-robin to ranks, sums are reduced, and all ranks make the same number
    of forward calls, so every rank returns the same figures.
    """

    def __init__(self, paths: tuple[str, ...], tokenizer, max_len: int, batch_size: int):
        if batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batches = {
            name: batches(retention_items(tokenizer, p, max_len), batch_size, pad)
            for name, p in zip(corpus_names(paths), paths)
        }

    def measure(self, model, accelerator=None, prefix: str = "retention") -> dict[str, float]:
        """{prefix}_loss/<name> and {prefix}_ppl/<name> per corpus; the model's train/eval mode is restored."""
        rank = accelerator.process_index if accelerator is not None else 0
        world = accelerator.num_processes if accelerator is not None else 1
        device = accelerator.device if accelerator is not None else _model_device(model)
        was_training = model.training
        model.eval()
        out = {}
        try:
            for name, bs in self.batches.items():
                total, count, _ = shard_sums(model, bs, rank, world, device)
                if world > 1:
                    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
                    total, count = accelerator.reduce(t, reduction="sum").tolist()
                stats = loss_stats(total, int(count))
                out[f"{prefix}_loss/{name}"] = stats["loss"]
                out[f"{prefix}_ppl/{name}"] = stats["ppl"]
        finally:
            model.train(was_training)
        return out


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# ---------------------------------------------------------------- generation


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
def greedy_scores(model, tokenizer, items: list[dict], batch_size: int, device) -> dict:
    """Greedy generations scored against the references.

    exact_match: whitespace-normalised decoded text equal (case-sensitive).
    token_accuracy: share of reference tokens (response + EOS) that the generation matches position-wise.
    Generation stops at EOS or at len(reference) + GEN_SLACK tokens.
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
        cfg = GenerationConfig(max_new_tokens=max(len(r) for _, r in chunk) + GEN_SLACK, do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos)
        out = model.generate(input_ids=ids, attention_mask=attn, generation_config=cfg)[:, width:].tolist()
        for (p, ref), gen in zip(chunk, out):
            gen = gen[: len(ref) + GEN_SLACK]
            if eos is not None and eos in gen:
                gen = gen[: gen.index(eos) + 1]
            matched += sum(g == r for g, r in zip(gen, ref))
            ref_tokens += len(ref)
            ref_text = tokenizer.decode(ref, skip_special_tokens=True)
            gen_text = tokenizer.decode(gen, skip_special_tokens=True)
            exact += normalise(gen_text) == normalise(ref_text)
            samples.append({"prompt": tokenizer.decode(p, skip_special_tokens=True), "reference": ref_text, "generation": gen_text})
    model.train(was_training)
    return {"exact_match": exact / len(pairs), "token_accuracy": matched / ref_tokens, "generated": len(pairs), "samples": samples}


# ---------------------------------------------------------------- continual learning


CL_CONVENTION = (
    "Lopez-Paz & Ranzato (2017), GEM: R[i][j] is the score on task j after training on tasks 1..i (row i = checkpoint i, "
    "in training order); b_j is the base model's score on task j (the paper uses a randomly initialised model; here the "
    "pre-trained base). With T tasks: ACC = (1/T) sum_j R[T][j]; BWT = 1/(T-1) sum_{j<T} (R[T][j] - R[j][j]) "
    "(negative = forgetting); FWT = 1/(T-1) sum_{j>1} (R[j-1][j] - b_j) (positive = earlier tasks helped a later one "
    "before it was trained). BWT and FWT need T >= 2."
)


def cl_metrics(R, baseline) -> dict:
    """ACC, BWT and FWT of a T x T score matrix R (row i: after training on task i) and base scores b (length T)."""
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise UsageError(f"the continual-learning matrix must be square with at least one task; got {[len(r) for r in R]} x {T}")
    if len(baseline) != T:
        raise UsageError(f"baseline has {len(baseline)} scores for {T} tasks")
    acc = sum(R[T - 1][j] for j in range(T)) / T
    bwt = sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else None
    fwt = sum(R[j - 1][j] - baseline[j] for j in range(1, T)) / (T - 1) if T > 1 else None
    return {"ACC": acc, "BWT": bwt, "FWT": fwt, "T": T}


def load_sequence(path: str) -> list[dict]:
    """[{task, checkpoint, name}] from YAML/JSON; relative paths resolve against the file's folder first."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--sequence file {path} not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: malformed YAML/JSON: {str(err).splitlines()[0]}") from err
    if isinstance(raw, dict):
        raw = raw.get("sequence")
    if not isinstance(raw, list) or not raw or not all(isinstance(e, dict) and "task" in e and "checkpoint" in e for e in raw):
        raise UsageError(f"{path}: expected a non-empty list of {{task: DATA, checkpoint: DIR}} entries in training order")

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
        raise UsageError(f"--{expected} {path} is not a {'PEFT adapter folder (no adapter_config.json)' if expected == 'adapter' else 'model folder (no config.json)'}; pass the folder the run saved, e.g. RUN/final")
    else:
        raise UsageError(f"{path} is neither a PEFT adapter (adapter_config.json) nor a model folder (config.json)")
    if expected == "adapter" and kind != "adapter":
        raise UsageError(f"--adapter {path} is not a PEFT adapter folder (no adapter_config.json); for a full model folder use --finetuned")
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
        raise UsageError("fnscale eval runs as one process on one device; run it without `accelerate launch` (training uses RetentionProbe on every rank)")
    if cfg.generate < 0 or cfg.batch_size < 1 or cfg.max_seq_length < 8:
        raise UsageError("--generate must be >= 0, --batch-size >= 1 and --max-seq-length >= 8")
    if cfg.lm_eval_tasks and not lm_eval_available():
        raise UsageError("--lm-eval-tasks needs the lm-eval harness: run `pip install lm-eval` (or `pip install fnscale[eval]`), or drop the flag")
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
        tokenizer, source, cfg.max_seq_length, cfg.schema, cfg.template, cfg.validation_split if cfg.task_split != "all" else 0.0,
        cfg.seed, None, cfg.prompt_column, cfg.response_column, cfg.max_samples,
    )
    items = {"validation": sft.validation, "train": sft.train, "all": sft.train}[cfg.task_split]
    if not items:
        raise UsageError(f"task data {source}: no held-out examples with --validation-split {cfg.validation_split}; raise it or use --task-split all")
    gen = [items[i] for i in pick(len(items), cfg.generate, cfg.seed)] if cfg.generate else []
    return TaskSet(name, source, items, gen)


def _training_notes(v: Variant, cfg: EvalConfig) -> list[str]:
    """Warn when the run's summary.json shows a different held-out split, so 'held out' would be false."""
    summary = Path(v.path).parent / "summary.json"
    if cfg.task_split != "validation" or not summary.is_file():
        return []
    try:
        tc = json.loads(summary.read_text()).get("config", {})
    except (OSError, ValueError):
        return []
    diffs = [k for k in ("validation_split", "seed", "max_samples") if k in tc and tc[k] != getattr(cfg, k)]
    if tc.get("validation_dataset"):
        diffs.append("validation_dataset")
    return [f"{v.label}: training used a different {', '.join(diffs)}; its held-out split differs from this one"] if diffs else []


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int, seed: int) -> dict[str, dict[str, float]]:
    """Numeric metrics per lm-eval task; any harness failure (unknown task, data unreachable) is one line."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA layers are injected in place
    try:
        lm = HFLM(pretrained=inner, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=tasks, limit=limit, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False)
    except Exception as err:  # the harness raises many kinds; the user needs the first line
        msg = (str(err).splitlines() or [""])[0][:200]
        raise UsageError(f"lm-eval tasks {','.join(tasks)} could not run ({type(err).__name__}: {msg}); check the task names and that their data can be downloaded") from err
    return {
        task: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for task, metrics in (out or {}).get("results", {}).items()
    }


class _Loaded:
    """Context manager yielding a variant's model; adapters go onto the shared base and come off after.

    PEFT's `unload()` keeps a trained copy of `modules_to_save` (e.g. lm_head) in the model, so the
    base's own module objects are put back afterwards: LoRA never writes to them unless merged.
    """

    def __init__(self, v: Variant, base, cfg: EvalConfig, dtype, device):
        self.v, self.base, self.cfg, self.dtype, self.device = v, base, cfg, dtype, device
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
                raise UsageError(f"adapter {self.v.path} does not fit the base model: {str(err).splitlines()[0][:200]}") from err
        else:
            src = models.ModelSource(self.v.path, self.v.label)
            self.model = models.load_model(src, self.dtype, None, self.cfg.trust_remote_code).to(self.device)
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


def score_model(model, tokenizer, tasks: list[TaskSet], retention: dict[str, list[dict]], cfg: EvalConfig, device) -> dict:
    pad = tokenizer.pad_token_id
    vocab = model.get_input_embeddings().num_embeddings
    if vocab < len(tokenizer):
        raise UsageError(f"model has {vocab} embeddings but the base tokenizer has {len(tokenizer)} tokens; fine-tuned models must share the base tokenizer")
    result = {"task": {}, "retention": {}}
    for t in tasks:
        torch.manual_seed(cfg.seed)
        scores = corpus_loss(model, t.items, cfg.batch_size, pad, device)
        scores.update(greedy_scores(model, tokenizer, t.gen_items, cfg.batch_size, device) if t.gen_items else {"exact_match": None, "token_accuracy": None, "generated": 0, "samples": []})
        result["task"][t.name] = scores
    for name, items in retention.items():
        result["retention"][name] = corpus_loss(model, items, cfg.batch_size, pad, device)
    if cfg.lm_eval_tasks:
        tasks_ = [x.strip() for x in cfg.lm_eval_tasks.split(",") if x.strip()]
        result["lm_eval"] = run_lm_eval(model, tokenizer, tasks_, cfg.lm_eval_limit, cfg.batch_size, cfg.seed)
    return result


def run_eval(cfg: EvalConfig) -> dict:
    """Score the base and every variant, then write report.json/.md, the plot and TensorBoard scalars."""
    from fnscale import report

    variants, task_sources = plan(cfg)
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file; pick a folder")
    device = models.pick_device(cfg.device)
    dtype = models.resolve_dtype(cfg.dtype, device)
    source = models.resolve_model(cfg.model, cfg.gguf_file)
    tokenizer = models.load_tokenizer(source, cfg.trust_remote_code)
    torch.manual_seed(cfg.seed)

    task_names = corpus_names(task_sources, "sample") if cfg.sequence else ["task"]
    tasks = [task_set(tokenizer, s, cfg, n) for n, s in zip(task_names, task_sources)]
    for t in tasks if cfg.sequence else []:
        if not any(split_prompt(i)[0] for i in t.gen_items):
            raise UsageError(f"sequence task {t.source} is plain text (no prompts), so --cl-metric {cfg.cl_metric} cannot be scored on it")
    ret_sources = [] if tuple(cfg.retention) == ("none",) else list(cfg.retention or (str(data.default_retention_path()),))
    retention = {n: retention_items(tokenizer, s, cfg.max_seq_length, cfg.max_samples) for n, s in zip(corpus_names(ret_sources), ret_sources)}

    base = models.load_model(source, dtype, None, cfg.trust_remote_code).to(device)
    results = []
    for v in variants:
        log.info("scoring %s", v.label)
        if v.path:
            v.notes.extend(_training_notes(v, cfg))
        with _Loaded(v, base, cfg, dtype, device) as model:
            scores = score_model(model, tokenizer, tasks, retention, cfg, device)
        results.append({"label": v.label, "kind": v.kind, "path": v.path, **scores})

    meta = {
        "model": source.display_name,
        "tasks": [{"name": t.name, "source": t.source, "split": cfg.task_split, "examples": len(t.items), "generated": len(t.gen_items)} for t in tasks],
        "retention": [{"name": n, "source": s, "chunks": len(retention[n])} for n, s in zip(retention, ret_sources)],
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
