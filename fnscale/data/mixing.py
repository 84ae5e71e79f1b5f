"""Several datasets in one run: per-dataset schema and weight, seeded held-out splits, a reproducible mix.

A weight multiplies how many of a dataset's training examples are used: 0.2 takes a seeded fifth,
2 uses each example twice, 1.5 all of them plus a seeded half. The held-out split is taken per dataset
before weighting, with the run's seed, so `eval --task` finds the same held-out examples as training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from fnscale.data.schemas import resolve_shape
from fnscale.data.sources import DatasetSpec, expand_specs, load_raw
from fnscale.data.tokenize import check_max_len, tokenize_dataset, truncate
from fnscale.errors import UsageError


@dataclass
class DataOptions:
    """How rows become tokens: the run's defaults; a dataset's own `schema`/`columns` override them."""

    schema: str = "auto"
    template: str = "auto"
    prompt_column: str | None = None
    response_column: str | None = None
    train_on_inputs: bool = False
    max_samples: int | None = None  # the first N rows of each dataset


@dataclass
class SFTData:
    train: list[dict]
    validation: list[dict]
    schema: str  # the shapes used, comma-separated
    counts: dict[str, int] = field(default_factory=dict)  # training examples used, per dataset
    validation_counts: dict[str, int] = field(default_factory=dict)


def tokenized(tokenizer, spec: DatasetSpec, opts: DataOptions):
    """One dataset read and tokenised (full length, cached by datasets), and the name of its shape."""
    raw = load_raw(spec)
    if opts.max_samples:
        raw = raw.select(range(min(len(raw), opts.max_samples)))
    columns = spec.columns or {}
    shape = resolve_shape(
        raw.column_names,
        spec.schema or opts.schema,
        columns.get("prompt", opts.prompt_column),
        columns.get("response", opts.response_column),
    )
    return tokenize_dataset(raw, tokenizer, shape, opts.template, opts.train_on_inputs), shape.name


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out split for data without one; fraction 0 keeps everything for training."""
    if not 0 <= fraction < 1:
        raise UsageError(f"--validation-split {fraction} must be in [0, 1)")
    if fraction == 0 or len(items) < 2:
        return items, []
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, int(round(len(items) * fraction)))
    val = set(idx[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


def weighted(indices: list[int], weight: float, seed: int) -> list[int]:
    """Each index int(weight) times, plus a seeded share of the fractional part (at least one example)."""
    whole, frac = divmod(weight, 1.0)
    out = list(indices) * int(whole)
    extra = int(round(frac * len(indices)))
    out += sorted(random.Random(seed).sample(indices, extra)) if extra else []
    return out or sorted(random.Random(seed).sample(indices, min(1, len(indices))))


def items_at(ds, indices: list[int], max_len: int) -> list[dict]:
    """Truncated items at these rows (in this order); rows with nothing left to train are dropped."""
    if not indices:
        return []
    cols = ds.select(indices)[:]
    rows = zip(cols["input_ids"], cols["labels"], cols["cut"])
    return [
        t for t in (truncate({"input_ids": i, "labels": lab, "cut": c}, max_len) for i, lab, c in rows) if t is not None
    ]


def build_sft_data(
    tokenizer,
    source,
    max_len: int,
    schema: str = "auto",
    template: str = "auto",
    validation_split: float = 0.05,
    seed: int = 42,
    validation_source=None,
    prompt_column: str | None = None,
    response_column: str | None = None,
    max_samples: int | None = None,
    *,
    train_on_inputs: bool = False,
) -> SFTData:
    """Read, tokenise, split and mix the datasets of a run (a spec, a list of specs, or a YAML list of them)."""
    check_max_len(max_len)
    opts = DataOptions(schema, template, prompt_column, response_column, train_on_inputs, max_samples)
    specs = expand_specs(source)
    train, val, shapes, counts, val_counts = [], [], [], {}, {}
    for k, spec in enumerate(specs):
        ds, shape = tokenized(tokenizer, spec, opts)
        shapes.append(shape)
        tr_idx, va_idx = (
            (list(range(len(ds))), [])
            if validation_source
            else split_validation(list(range(len(ds))), validation_split, seed)
        )
        part = items_at(ds, weighted(tr_idx, spec.weight, seed + k), max_len)
        if not part:
            raise UsageError(f"{spec.name}: --max-seq-length {max_len} is too small to hold any response; raise it")
        held = items_at(ds, va_idx, max_len)
        train, val = train + part, val + held
        counts[spec.name], val_counts[spec.name] = len(part), len(held)
    if validation_source:
        for spec in expand_specs(validation_source):
            ds, _ = tokenized(tokenizer, spec, opts)
            held = items_at(ds, list(range(len(ds))), max_len)
            val, val_counts[spec.name] = val + held, len(held)
    if len(specs) > 1:  # interleave the datasets (seeded), so any prefix of the training list is a fair mix
        random.Random(seed).shuffle(train)
    return SFTData(train, val, ",".join(dict.fromkeys(shapes)), counts, val_counts)


def sample_items(
    tokenizer, sources, samples_per_dataset: int, max_len: int, seed: int = 0, opts: DataOptions | None = None
) -> tuple[list[dict], dict[str, int], dict[str, int]]:
    """Up to N examples from each dataset (a seeded choice; a dataset's `samples` overrides N), rendered like training
    data and truncated: the items ({input_ids, labels}), tokens per dataset and examples per dataset."""
    check_max_len(max_len)
    opts = opts or DataOptions()
    out, tokens, examples = [], {}, {}
    for spec in expand_specs(sources):
        ds, _ = tokenized(tokenizer, spec, opts)
        n = spec.samples if spec.samples is not None else samples_per_dataset
        idx = sorted(random.Random(seed).sample(range(len(ds)), n)) if n and len(ds) > n else list(range(len(ds)))
        items = items_at(ds, idx, max_len)
        if not items:
            raise UsageError(f"no usable samples in {spec.name} at --max-seq-length {max_len}")
        out.extend(items)
        tokens[spec.name], examples[spec.name] = sum(len(i["input_ids"]) for i in items), len(items)
    return out, tokens, examples


def sample_token_ids(
    tokenizer, sources, samples_per_dataset: int, max_len: int, seed: int = 0, opts: DataOptions | None = None
) -> tuple[list[list[int]], dict[str, int], dict[str, int]]:
    """`templates build` input: the token ids of `sample_items`, tokens per dataset and examples per dataset."""
    items, tokens, examples = sample_items(tokenizer, sources, samples_per_dataset, max_len, seed, opts)
    return [i["input_ids"] for i in items], tokens, examples
