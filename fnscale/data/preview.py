"""`fnscale data show`: what training will see — shapes, counts, token lengths, and examples with the trained
tokens marked (the same rendering and label masks as training, through the same cached tokenisation)."""

from __future__ import annotations

import numpy as np

from fnscale.data.mixing import DataOptions, tokenized
from fnscale.data.sources import expand_specs
from fnscale.data.tokenize import IGNORE, truncate

MARKS = {"brackets": ("[[", "]]"), "colour": ("\x1b[1;32m", "\x1b[0m"), "none": ("", "")}


def length_stats(lengths: list[int], max_len: int) -> dict:
    a = np.asarray(lengths, dtype=np.int64)
    return {
        "min": int(a.min()),
        "mean": round(float(a.mean()), 1),
        "median": float(np.median(a)),
        "p95": float(np.percentile(a, 95)),
        "max": int(a.max()),
        "over_max_seq_length": int((a > max_len).sum()),
        "max_seq_length": max_len,
    }


def padding(lengths: list[int], max_len: int, batch_size: int, seed: int = 0) -> dict:
    """Share of real tokens when shuffled examples are batched and padded to each batch's longest, as training pads
    them. Packing removes the padding, so padded/real tokens bounds the speed-up `--packing` can give where a step
    costs what its tokens cost, as on CPU (a GPU's cost per token varies with batch shape: measure there)."""
    a = np.minimum(np.asarray(lengths, dtype=np.int64), max_len)
    a = a[np.random.default_rng(seed).permutation(len(a))]
    batches = [a[i : i + batch_size] for i in range(0, len(a), batch_size)]
    padded = sum(len(b) * int(b.max()) for b in batches)
    real = int(a.sum())
    return {
        "batch_size": batch_size,
        "real_share": round(real / padded, 3),
        "packing_gain_bound": round(padded / real, 2),
    }


def marked(tokenizer, item: dict, style: str = "brackets") -> tuple[str, list[list]]:
    """The decoded item with trained spans wrapped in marks, and its [text, trained] segments."""
    segments, run, flag = [], [], None
    for tok, label in zip(item["input_ids"], item["labels"]):
        trained = label != IGNORE
        if run and trained != flag:
            segments.append([tokenizer.decode(run), flag])
            run = []
        run.append(tok)
        flag = trained
    if run:
        segments.append([tokenizer.decode(run), flag])
    start, end = MARKS[style]
    return "".join(f"{start}{t}{end}" if trained else t for t, trained in segments), segments


def preview(
    tokenizer,
    sources,
    n: int = 3,
    max_len: int = 512,
    opts: DataOptions | None = None,
    style: str = "brackets",
    batch_size: int = 4,
) -> dict:
    """Shapes and counts per dataset, token-length statistics and padding over all of them, and the first n examples."""
    import pyarrow.compute as pc

    opts = opts or DataOptions()
    report, lengths, shown = {"datasets": [], "examples": []}, [], []
    for spec in expand_specs(sources):
        ds, shape = tokenized(tokenizer, spec, opts)
        report["datasets"].append({"name": spec.name, "schema": shape, "examples": len(ds), "weight": spec.weight})
        lengths += pc.list_value_length(ds.data.column("input_ids")).to_pylist()
        for i in range(min(max(0, n - len(shown)), len(ds))):
            item = truncate(ds[i], max_len)
            if item is None:
                continue
            text, segments = marked(tokenizer, item, style)
            shown.append(
                {
                    "dataset": spec.name,
                    "index": i,
                    "tokens": len(item["input_ids"]),
                    "trained_tokens": sum(label != IGNORE for label in item["labels"]),
                    "text": text,
                    "segments": segments,
                }
            )
    report["tokens"] = length_stats(lengths, max_len)
    report["padding"] = padding(lengths, max_len, batch_size)
    report["examples"] = shown
    return report
